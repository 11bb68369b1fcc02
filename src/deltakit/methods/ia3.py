"""(IA)^3: Infused Adapter by Inhibiting and Amplifying Inner Activations
(Liu et al., 2022) https://arxiv.org/abs/2205.05638

    attention keys / values:  y = l ⊙ (W x + b)    ->  dW = W ⊙ (l - 1)[:, None],  db = b ⊙ (l - 1)
    feed-forward (down-proj): y = W (l ⊙ x) + b    ->  dW = W ⊙ (l - 1)[None, :]

``l`` is one learned vector per target, initialised to ones (so the model starts
equal to the base): length ``out`` for keys / values, length ``in`` for the
feed-forward targets (the paper rescales the FFN intermediate activation, i.e. the
input of the down-projection). Which targets are feed-forward is the config's
``feedforward`` patterns. Shapes: Linear ``l: (out,)`` or ``(in,)``; Conv2d scales
channels. GPT-2's fused ``c_attn`` is scaled as a whole (queries too), as in peft.

>>> import torch, deltakit as dk
>>> from deltakit.methods.ia3 import IA3Config
>>> m = torch.nn.Sequential(torch.nn.Linear(4, 3))
>>> ad = dk.attach(m, IA3Config(targets=["0"]))
>>> [tuple(p.shape) for p in ad.parameters()]
[(3,)]
"""
from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from ..core.delta import BuildContext, WeightDelta, param_dtype
from ..core.fields import knob
from ..core.registry import DeltaConfig, register_method
from ..core.targets import matches
from ._base_ops import Conv1D
from ._layout import in_axis, out_axis

__all__ = ["IA3Config", "IA3", "scale_along"]

# The FFN down-projections of the families we know (BERT's ``attention.output.dense``
# is NOT feed-forward, hence the regex instead of the suffix ``output.dense``).
_FEEDFORWARD = (r"re:(.*\.)?layer\.\d+\.output\.dense", "mlp.c_proj", "down_proj")


@dataclass(frozen=True)
class IA3Config(DeltaConfig):
    """(IA)^3 hyper-parameters."""

    feedforward: tuple[str, ...] = knob(
        _FEEDFORWARD, doc="target patterns (same syntax as ``targets``) whose vector scales the INPUT "
                          "features; every other target scales its output. Default: the FFN down-projections "
                          "of BERT, GPT-2 and Llama-style models")

    def __post_init__(self) -> None:
        if isinstance(self.feedforward, str):
            object.__setattr__(self, "feedforward", (self.feedforward,))
        super().__post_init__()


def scale_along(w: Tensor, v: Tensor, axis: int) -> Tensor:
    """``w`` multiplied by vector ``v`` broadcast along ``axis``."""
    shape = [1] * w.dim()
    shape[axis] = -1
    return w * v.reshape(shape)


@register_method("ia3", IA3Config, paper="https://arxiv.org/abs/2205.05638",
                 description="learned vectors rescaling keys, values and FFN inputs (W ⊙ l)")
class IA3(WeightDelta):
    supported = (nn.Linear, Conv1D, nn.Conv2d)
    weight_dependent = True
    default_targets = {
        "bert": ("key", "value", _FEEDFORWARD[0]),
        "roberta": ("key", "value", _FEEDFORWARD[0]),
        "gpt2": ("c_attn", "mlp.c_proj"),
        "llama": ("k_proj", "v_proj", "down_proj"),
        "mistral": ("k_proj", "v_proj", "down_proj"),
        "qwen2": ("k_proj", "v_proj", "down_proj"),
    }

    def __init__(self, base: nn.Module, config: IA3Config, ctx: BuildContext):
        super().__init__()
        self.feedforward = any(matches(ctx.name, p) for p in config.feedforward)
        self.axis = in_axis(base) if self.feedforward else out_axis(base)
        n = base.weight.shape[self.axis]
        dtype = param_dtype(base, config.adapter_dtype)
        self.ia3_l = nn.Parameter(torch.ones(n, device=base.weight.device, dtype=dtype))

    def delta(self, base: Mapping[str, Tensor]) -> dict[str, Tensor]:
        s = self.ia3_l.float() - 1.0
        out = {"weight": scale_along(base["weight"].float(), s, self.axis)}
        # Output scaling also scales the bias ((Wx + b) * l); input scaling leaves it.
        if not self.feedforward and base.get("bias") is not None:
            out["bias"] = base["bias"].float() * s
        return out

    def extra_repr(self) -> str:
        return f"scales={'input' if self.feedforward else 'output'}, n={self.ia3_l.numel()}"
