"""Tied-LoRA: LoRA with weight tying and selective training (Renduchintala et al., 2023)
https://arxiv.org/abs/2311.09578

    W'_l = W_l + s * diag(v_l) B diag(u_l) A,   s = alpha / r

A (r, in) and B (out, r) are ONE pair shared by all targets of the same (in, out)
shape (the adapter's shared module, stored once); u_l (r,) and v_l (out,) belong to
each target. ``trainable`` picks which of A, B, u, v train - the paper's family of
configurations: all four (default: tied A, B plus per-layer scaling vectors, which
we read as the paper's recommended TL6, close to LoRA at a fraction of its parameters),
``("A", "B")`` (plain tied LoRA), ``("u", "v")`` (VeRA-like: frozen random tied
factors), and so on.

Init keeps the model equal to the base: if B trains it starts at zero with u = v = 1;
otherwise B is a frozen random matrix and v starts at zero (so v must train). A is
random (kaiming-uniform). A frozen factor is a non-persistent buffer regenerated from
``seed`` and its shape, so it is NOT in the file; frozen u / v are constants (ones).

>>> import torch, deltakit as dk
>>> m = torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.Linear(8, 8))
>>> ad = dk.attach(m, dk.get_method("tied_lora").config(r=2, targets=["0", "1"]))
>>> ad.num_parameters()   # tied r*(in+out) + per layer (r + out)
52
"""
from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from ..core.delta import BuildContext, WeightDelta, param_dtype
from ..core.fields import knob
from ..core.registry import ConfigError, DeltaConfig, register_method
from ._base_ops import Conv1D, in_out
from ._lora_common import seeded_init
from .lora import _cast

__all__ = ["TiedLoraConfig", "TiedLoRA"]

_PARTS = ("A", "B", "u", "v")


@dataclass(frozen=True)
class TiedLoraConfig(DeltaConfig):
    """Tied-LoRA hyper-parameters."""

    r: int = knob(8, ge=1, log=True, doc="rank of the shared factors")
    alpha: float = knob(16.0, gt=0, log=True, doc="scale numerator; the update is multiplied by ``alpha / r``")
    dropout: float = knob(0.0, ge=0, lt=1, doc="dropout on the branch input (training only)")
    trainable: tuple[str, ...] = knob(
        _PARTS, doc="which of ``\"A\"``, ``\"B\"`` (tied factors), ``\"u\"``, ``\"v\"`` (per-layer scaling "
                    "vectors) train; the rest are frozen")
    seed: int = knob(0, doc="seed of the frozen random factors (regenerated at load, not stored)")

    def validate(self) -> None:
        bad = [t for t in self.trainable if t not in _PARTS]
        if bad or not self.trainable:
            raise ConfigError(f"TiedLoraConfig.trainable: expected a non-empty subset of {list(_PARTS)}, "
                              f"found {list(self.trainable)}")
        if "B" not in self.trainable and "v" not in self.trainable:
            raise ConfigError("TiedLoraConfig.trainable: expected 'B' or 'v' among the trained parts (one of them "
                              f"starts at zero so the model starts at the base), found {list(self.trainable)}")


def _shape_key(fan_in: int, fan_out: int) -> str:
    return f"{fan_in}x{fan_out}"


class TiedFactors(nn.Module):
    """The A (r, in), B (out, r) pair shared by every target of one shape."""

    def __init__(self, config: TiedLoraConfig, fan_in: int, fan_out: int, device, dtype: torch.dtype):
        super().__init__()
        key = _shape_key(fan_in, fan_out)
        A = seeded_init((config.r, fan_in), "kaiming", config.seed, f"A{key}", device=device, dtype=dtype)
        if "B" in config.trainable:
            B = torch.zeros(fan_out, config.r, device=device, dtype=dtype)
        else:
            B = seeded_init((fan_out, config.r), "kaiming", config.seed, f"B{key}", device=device, dtype=dtype)
        for name, t in (("lora_A", A), ("lora_B", B)):
            if name[-1] in config.trainable:
                setattr(self, name, nn.Parameter(t))
            else:
                self.register_buffer(name, t, persistent=False)


@register_method("tied_lora", TiedLoraConfig, paper="https://arxiv.org/abs/2311.09578",
                 description="one A, B pair tied across layers, per-layer scaling vectors u, v")
class TiedLoRA(WeightDelta):
    supported = (nn.Linear, Conv1D)

    @classmethod
    def build_shared(cls, config: TiedLoraConfig, targets: Mapping[str, nn.Module]) -> nn.Module:
        pairs = nn.ModuleDict()
        for base in targets.values():
            fan_in, fan_out = in_out(base)
            key = _shape_key(fan_in, fan_out)
            if key not in pairs:
                dev = next(base.parameters()).device
                pairs[key] = TiedFactors(config, fan_in, fan_out, dev, param_dtype(base, config.adapter_dtype))
        return pairs

    def __init__(self, base: nn.Module, config: TiedLoraConfig, ctx: BuildContext):
        super().__init__()
        if ctx is None or ctx.shared is None:
            raise ConfigError("TiedLoRA needs the adapter's shared factors (build it through dk.attach)")
        fan_in, fan_out = in_out(base)
        pair = ctx.shared[_shape_key(fan_in, fan_out)]
        # a reference, not a submodule: the pair is stored once, under deltakit_shared
        object.__setattr__(self, "_shared", pair)
        self.layout = "conv1d" if isinstance(base, Conv1D) else "linear"
        self.r = config.r
        self.scale = config.alpha / config.r
        dev, dtype = pair.lora_A.device, pair.lora_A.dtype
        u = torch.ones(config.r, device=dev, dtype=dtype)
        v = (torch.ones if "B" in config.trainable else torch.zeros)(fan_out, device=dev, dtype=dtype)
        for name, t in (("u", u), ("v", v)):
            if name in config.trainable:
                setattr(self, name, nn.Parameter(t))
            else:
                self.register_buffer(name, t, persistent=False)
        self.dropout = nn.Dropout(config.dropout) if config.dropout > 0 else nn.Identity()

    def delta(self, base: Mapping[str, Tensor]) -> dict[str, Tensor]:
        A, B = self._shared.lora_A, self._shared.lora_B
        dw = (self.v[:, None] * B) @ (self.u[:, None] * A) * self.scale     # (out, in)
        return {"weight": dw.t() if self.layout == "conv1d" else dw}

    def factors(self) -> tuple[Tensor, Tensor, float, tuple[int, ...]]:
        """``(B', A', s, shape)`` with ``dW = s B' @ A'`` in the weight's layout (task vectors)."""
        A = self._shared.lora_A
        Bp = self.v[:, None] * self._shared.lora_B * self.u[None, :]     # (out, r)
        if self.layout == "conv1d":
            return A.t(), Bp.t(), self.scale, (A.shape[1], Bp.shape[0])
        return Bp, A, self.scale, (Bp.shape[0], A.shape[1])

    def residual(self, base: nn.Module, x: Tensor) -> Tensor:
        A, B = self._shared.lora_A, self._shared.lora_B
        h = self.dropout(_cast(x, A)) @ A.t() * self.u                      # (..., r)
        return (h @ B.t()) * (self.v * self.scale)                          # (..., out)
