"""LoHa: low-rank Hadamard product (FedPara, Hyeon-Woo et al., 2022; as in LyCORIS)
https://arxiv.org/abs/2108.06098

    dW = s * (hada_w1_a @ hada_w1_b) * (hada_w2_a @ hada_w2_b),    s = alpha / r
    hada_w*_a: (out, r),  hada_w*_b: (r, in)      (Conv2d: in -> in * kh * kw, then reshaped)

The Hadamard product of two rank-r matrices has rank up to r^2 for 2 r (in + out)
parameters. Init as peft's LoHa: w1_a, w1_b, w2_a kaiming-uniform, w2_b zero,
so dW = 0 and the model starts at the base. Conv2d kernels are flattened
(``(out, in*kh*kw)``), LyCORIS's non-CP form.

>>> import torch, deltakit as dk
>>> m = torch.nn.Sequential(torch.nn.Linear(8, 4))
>>> ad = dk.attach(m, dk.get_method("loha").config(r=2, targets=["0"]))
>>> ad.num_parameters()  # 2 * r * (in + out)
48
"""
from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from ..core.delta import BuildContext, WeightDelta, param_dtype
from ..core.fields import knob
from ..core.registry import ConfigError, DeltaConfig, register_method
from ._banks import layout, to_layout
from ._base_ops import Conv1D, in_out

__all__ = ["LohaConfig", "LoHa"]


@dataclass(frozen=True)
class LohaConfig(DeltaConfig):
    """LoHa hyper-parameters."""

    r: int = knob(8, ge=1, log=True, doc="rank of each of the two factor products")
    alpha: float = knob(8.0, gt=0, log=True, doc="scale numerator; dW is multiplied by ``alpha / r``")


@register_method("loha", LohaConfig, paper="https://arxiv.org/abs/2108.06098",
                 description="Hadamard product of two low-rank products (FedPara / LyCORIS LoHa)")
class LoHa(WeightDelta):
    supported = (nn.Linear, Conv1D, nn.Conv2d)

    def __init__(self, base: nn.Module, config: LohaConfig, ctx: BuildContext | None = None):
        super().__init__()
        if isinstance(base, nn.Conv2d) and base.groups != 1:
            raise ConfigError(f"LoHa on grouped Conv2d is not supported (groups={base.groups})")
        fan_in, fan_out = in_out(base)
        self.layout = layout(base)
        self.shape = tuple(base.weight.shape) if isinstance(base, nn.Conv2d) else None
        cols = fan_in * math.prod(base.kernel_size) if isinstance(base, nn.Conv2d) else fan_in
        dev = next(base.parameters()).device
        dtype = param_dtype(base, config.adapter_dtype)
        r = config.r
        self.scale = config.alpha / r

        def p(*shape):
            return nn.Parameter(torch.empty(shape, device=dev, dtype=dtype))

        self.hada_w1_a, self.hada_w1_b = p(fan_out, r), p(r, cols)
        self.hada_w2_a, self.hada_w2_b = p(fan_out, r), p(r, cols)
        for w in (self.hada_w1_a, self.hada_w1_b, self.hada_w2_a):
            nn.init.kaiming_uniform_(w, a=math.sqrt(5))
        nn.init.zeros_(self.hada_w2_b)

    def delta(self, base: Mapping[str, Tensor]) -> dict[str, Tensor]:
        dw = (self.hada_w1_a @ self.hada_w1_b) * (self.hada_w2_a @ self.hada_w2_b) * self.scale  # (out, cols)
        if self.shape is not None:
            return {"weight": dw.reshape(self.shape)}
        return {"weight": to_layout(dw, self.layout)}
