"""S2-LoRA: Sparsely Shared LoRA (Liu, Qin, Peng & Lee, "Sparsely Shared LoRA on Whisper for
Child Speech Recognition", ICASSP 2024, https://arxiv.org/abs/2309.11756).

    W'_l = W_l + s * B diag(lambda_l) A,   s = alpha / r,   loss += beta * sum_l ||lambda_l||_1

"The two low-rank decomposed matrices are globally shared. Each weight matrix only has to
maintain its specific rank coefficients that are constrained to be sparse" (the paper's
abstract): A (r, in) and B (out, r) are one pair for every target of the same shape (stored
once, in the adapter's shared module), and each target owns only lambda_l (r,), pushed to
zero by the L1 term :func:`regularizer` (add it to the loss, as AdaLoRA's orthogonality
penalty), so each layer learns how many of the shared rank directions it uses; the paper
reports the learned rank pattern resembling AdaLoRA's allocation (:func:`rank_pattern`).

This is the method the issue's "sparsely shared LoRA" names. ``share`` also covers the
"A or B shared across layers" configurations of ShareLoRA (Song et al. 2024, "ShareLoRA:
Parameter Efficient and Robust Large Language Model Fine-tuning via Shared Low-Rank
Adaptation", https://arxiv.org/abs/2406.10785; ShareA / ShareB / ShareAB): with
``share="A"`` only A is global and each target owns its B (and ``"B"`` conversely), the
sparse rank coefficients kept.

Initialisation follows AdaLoRA, whose learnable rank coefficients the paper builds on:
lambda = 0 (the model starts at the base), A and B ~ N(0, 0.02) (peft's AdaLoRA). The paper
does not spell these out; it is our reading. Trainable per shape group of n targets:
``r (in + out) + n r`` (``share="AB"``), ``r in + n (r out + r)`` (``"A"``),
``r out + n (r in + r)`` (``"B"``).

>>> import torch, deltakit as dk
>>> m = torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.Linear(8, 8))
>>> ad = dk.attach(m, dk.get_method("s2_lora").config(r=2, targets=["0", "1"]))
>>> ad.num_parameters()   # one shared A, B: 2 (8 + 8), plus lambda (2,) per target
36
"""
from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Literal

import torch
from torch import Tensor, nn

from ..core.adapter import active, adapters
from ..core.delta import BuildContext, param_dtype
from ..core.fields import knob
from ..core.registry import ConfigError, DeltaConfig, register_method
from ._banks import FactoredDelta, layout, linear_shape
from ._base_ops import Conv1D

__all__ = ["S2LoraConfig", "S2LoRA", "regularizer", "rank_pattern"]


@dataclass(frozen=True)
class S2LoraConfig(DeltaConfig):
    """S2-LoRA hyper-parameters."""

    r: int = knob(8, ge=1, log=True, doc="rank of the shared factors (the most any target can use)")
    alpha: float = knob(16.0, gt=0, log=True, doc="scale numerator; the update is multiplied by ``alpha / r``")
    share: Literal["AB", "A", "B"] = knob(
        "AB", doc="factors shared by all targets of one shape: ``AB`` (S2-LoRA), ``A`` or ``B`` (ShareLoRA's "
                  "ShareA / ShareB: the other factor is per target)")
    l1_weight: float = knob(1e-3, ge=0, doc="beta, weight of the L1 penalty on the rank coefficients in "
                                            ":func:`regularizer`")
    init_std: float = knob(0.02, gt=0, doc="std of the Gaussian init of A and B (lambda starts at zero)")


def _key(fan_in: int, fan_out: int) -> str:
    return f"{fan_in}x{fan_out}"


def _factor(shape: tuple[int, int], std: float, device, dtype) -> nn.Parameter:
    return nn.Parameter(torch.randn(shape, device=device, dtype=dtype) * std)


class SharedFactors(nn.Module):
    """The shared factor(s) of one target shape: ``lora_A`` (r, in) and / or ``lora_B`` (out, r)."""

    def __init__(self, config: S2LoraConfig, fan_in: int, fan_out: int, device, dtype: torch.dtype):
        super().__init__()
        if "A" in config.share:
            self.lora_A = _factor((config.r, fan_in), config.init_std, device, dtype)
        if "B" in config.share:
            self.lora_B = _factor((fan_out, config.r), config.init_std, device, dtype)


@register_method("s2_lora", S2LoraConfig, paper="https://arxiv.org/abs/2309.11756",
                 description="Sparsely Shared LoRA: A, B shared across layers, sparse per-layer rank coefficients")
class S2LoRA(FactoredDelta):
    supported = (nn.Linear, Conv1D)

    @classmethod
    def build_shared(cls, config: S2LoraConfig, targets: Mapping[str, nn.Module]) -> nn.Module:
        groups = nn.ModuleDict()
        for name, base in targets.items():
            fan_in, fan_out = linear_shape(base, "s2_lora")
            key = _key(fan_in, fan_out)
            if key not in groups:
                dev = next(base.parameters()).device
                groups[key] = SharedFactors(config, fan_in, fan_out, dev, param_dtype(base, config.adapter_dtype))
        return groups

    def __init__(self, base: nn.Module, config: S2LoraConfig, ctx: BuildContext):
        super().__init__()
        if ctx is None or ctx.shared is None:
            raise ConfigError("s2_lora needs the adapter's shared factors (build it through dk.attach)")
        fan_in, fan_out = linear_shape(base, "s2_lora")
        # a reference, not a submodule: the shared factors are stored once
        object.__setattr__(self, "_shared", ctx.shared[_key(fan_in, fan_out)])
        dev, dtype = next(base.parameters()).device, param_dtype(base, config.adapter_dtype)
        self.layout = layout(base)
        self.r = config.r
        self.scale = config.alpha / config.r
        self.lora_E = nn.Parameter(torch.zeros(config.r, device=dev, dtype=dtype))        # lambda_l (r,)
        if "A" not in config.share:
            self.lora_A = _factor((config.r, fan_in), config.init_std, dev, dtype)
        if "B" not in config.share:
            self.lora_B = _factor((fan_out, config.r), config.init_std, dev, dtype)

    def _own(self, name: str) -> Tensor:
        return self._parameters[name] if name in self._parameters else getattr(self._shared, name)

    def low_rank(self) -> tuple[Tensor, Tensor]:
        """``(A (r, in), B diag(lambda) (out, r))``."""
        return self._own("lora_A"), self._own("lora_B") * self.lora_E

    @classmethod
    def contract_config(cls, kind: str) -> S2LoraConfig | None:
        return None if kind == "conv" else S2LoraConfig(r=4)


def _s2_adapters(model: nn.Module, name: str | None) -> list:
    ads = adapters(model)
    if name is not None and name not in ads:
        raise KeyError(f"no adapter named {name!r} on this model; attached: {sorted(ads)}")
    names = [name] if name is not None else active(model)
    return [ads[n] for n in names if isinstance(ads[n].config, S2LoraConfig)]


def regularizer(model: nn.Module, name: str | None = None) -> Tensor:
    """``beta * sum_l ||lambda_l||_1`` over the targets of S2-LoRA adapter ``name`` (default:
    every active one; beta is each adapter's ``l1_weight``). Add it to the task loss before
    ``backward``: it is what makes the rank coefficients sparse."""
    total: Tensor | None = None
    for ad in _s2_adapters(model, name):
        for _, d in ad.deltas():
            term = ad.config.l1_weight * d.lora_E.abs().sum()
            total = term if total is None else total + term
    return total if total is not None else next(model.parameters()).new_zeros(())


@torch.no_grad()
def rank_pattern(model: nn.Module, name: str | None = None, *, tol: float = 0.0) -> dict[str, int]:
    """Per target, how many rank coefficients exceed ``tol`` in magnitude: the rank each layer
    learned to use out of the shared r."""
    return {path: int((d.lora_E.abs() > tol).sum()) for ad in _s2_adapters(model, name)
            for path, d in ad.deltas()}
