"""DoRA: Weight-Decomposed Low-Rank Adaptation (Liu et al., 2024) https://arxiv.org/abs/2402.09353

    W' = m * (W + s B A) / ||W + s B A||_c,   m initialised to ||W||_c

``||.||_c`` is the norm of each output unit's weights (over the input dims; the
paper's column norm of ``W in R^{d x k}``, peft's ``weight.norm(dim=1)`` for Linear).
Shapes: A (r, in), B (out, r) (Conv2d: A (r, in, kh, kw), B (out, r, 1, 1)),
magnitude m (out,). Trains m, A, B; B starts at zero so W' = W at init.

Gradient: with ``detach_norm=True`` (default, the paper's sec. 4.3 and peft) the norm
is treated as a constant in backward, which saves memory and changes only the
gradient, never the value; ``False`` back-propagates through it.
The update depends on W, so it runs through the dense path (W + dW); no dropout.

>>> import torch, deltakit as dk
>>> lin = torch.nn.Sequential(torch.nn.Linear(8, 4))
>>> ad = dk.attach(lin, dk.get_method("dora").config(r=2, targets=["0"]))
>>> ad.num_parameters()   # r * (in + out) + out
28
"""
from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import ClassVar

from torch import Tensor, nn

from ..core.delta import BuildContext
from ..core.fields import knob
from ..core.registry import ConfigError, register_method
from ._base_ops import Conv1D
from .lora import LoRA, LoraConfig

__all__ = ["DoraConfig", "DoRA", "column_norm"]


@dataclass(frozen=True)
class DoraConfig(LoraConfig):
    """DoRA hyper-parameters: LoRA's (``r``, ``alpha``, ``use_rslora``, ``init``) plus the fields below."""

    method: ClassVar[str] = ""

    detach_norm: bool = knob(True, doc="treat ``||W + s B A||_c`` as a constant in backward (paper sec. 4.3)")

    def validate(self) -> None:
        super().validate()
        if self.dropout != 0.0:
            raise ConfigError(f"DoraConfig.dropout: expected 0.0 (DoRA's update depends on W and is applied "
                              f"as a dense weight, so there is no separate branch input to drop), found {self.dropout!r}")


def column_norm(w: Tensor, layout: str) -> Tensor:
    """Per-output-unit L2 norm (out,) of a weight in its module's layout."""
    if layout == "conv1d":            # (in, out)
        return w.norm(p=2, dim=0)
    return w.reshape(w.shape[0], -1).norm(p=2, dim=1)   # (out, in[, kh, kw])


def _per_out(v: Tensor, like: Tensor, layout: str) -> Tensor:
    """Broadcast a per-output vector (out,) against a weight in its layout."""
    if layout == "conv1d":
        return v[None, :]
    return v.view(-1, *([1] * (like.dim() - 1)))


@register_method("dora", DoraConfig, paper="https://arxiv.org/abs/2402.09353",
                 description="magnitude m times the direction of W + s B A, column-normalised")
class DoRA(LoRA):
    supported = (nn.Linear, Conv1D, nn.Conv2d)
    weight_dependent = True
    # dW needs ||W + s B A||, i.e. the dense weight: no residual / batched fast path.
    residual = None
    mixed_residual = None
    routed_residual = None

    def factors(self) -> None:
        """dW = m (W + sBA) / ||W + sBA|| - W is full rank: task vectors get it dense."""
        return None

    def __init__(self, base: nn.Module, config: DoraConfig, ctx: BuildContext | None = None):
        super().__init__(base, config, ctx)
        self.detach_norm = config.detach_norm
        m = column_norm(base.weight.detach().float(), self.layout)
        self.magnitude = nn.Parameter(m.to(self.lora_A.dtype))

    def delta(self, base: Mapping[str, Tensor]) -> dict[str, Tensor]:
        w = base["weight"].float()
        v = w + self.product().float()                      # W + s B A, base layout
        norm = column_norm(v, self.layout)                  # (out,)
        if self.detach_norm:
            norm = norm.detach()
        scale = _per_out(self.magnitude.float() / norm, v, self.layout)
        return {"weight": v * scale - w}
