"""LoRETTA_rep: tensor-train re-parameterised LoRA (Yang et al., 2024) https://arxiv.org/abs/2402.11417

    dW = s * (A_tt @ B_tt).T,   s = alpha / r
    A_tt: (in, r) and B_tt: (r, out), each the full tensor of a tensor train, reshaped

Reshaping (as the reference code's ``TensorizedLinear``): the LoRA factor ``(in, r)``
is viewed row-major as a tensor whose modes are a factorisation of ``in`` followed by
one of ``r`` (each mode at most ``max_mode``, e.g. ``in=768, r=8`` -> ``(12, 8, 8, 8)``
with ``max_mode=12``); that tensor is a tensor train of cores ``(r_{k-1}, n_k, r_k)``
with TT-ranks ``r_0 = r_K = 1`` and ``tt_rank`` inside. ``B`` likewise over ``r``
then ``out``. Trainable per target: ``sum over both trains of sum_k r_{k-1} n_k r_k``.
The reference code instead looks the mode list up in a hand-written table per (r,
hidden size), whose modes may straddle the row/column split (e.g. r=8, 768 ->
``(8, 8, 12, 8)``); ours is computed for any shape and keeps each mode inside one
matrix index, so counts differ slightly from the paper's tables at equal TT-rank.

Init: ``init="gaussian"`` is the reference code's: every core ~ N(0, 1/r_k) times
``target_std ** (1/K)`` with ``target_std = sqrt(1 / (fan_in + fan_out))`` of that
factor; the model then does not start exactly at the base. ``init="zero"`` zeroes
the last core of ``B`` so it does (a deviation offered for base-exact starts).

>>> import torch, deltakit as dk
>>> m = torch.nn.Sequential(torch.nn.Linear(16, 8))
>>> ad = dk.attach(m, dk.get_method("loretta").config(r=4, tt_rank=2, max_mode=4, targets=["0"]))
>>> [tuple(c.shape) for c in ad.model[0].deltas["default"].cores_A]  # (16, 4) -> modes 4, 4, 4
[(1, 4, 2), (2, 4, 2), (2, 4, 1)]
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import torch
from torch import Tensor, nn

from ..core.delta import BuildContext, param_dtype
from ..core.fields import knob
from ..core.registry import DeltaConfig, register_method
from ._banks import FactoredDelta, layout, linear_shape
from ._base_ops import Conv1D

__all__ = ["LorettaConfig", "LoRETTA", "tt_modes", "tt_full"]


@dataclass(frozen=True)
class LorettaConfig(DeltaConfig):
    """LoRETTA_rep hyper-parameters."""

    r: int = knob(8, ge=1, log=True, doc="LoRA rank of the re-parameterised factors A (in, r) and B (r, out)")
    tt_rank: int = knob(5, ge=1, doc="inner TT-rank of each tensor train (the reference code's ``tensor_rank``)")
    max_mode: int = knob(16, ge=2, doc="largest mode size when factorising in / out / r into TT modes")
    alpha: float = knob(16.0, gt=0, log=True, doc="scale numerator; dW is multiplied by ``alpha / r``")
    init: Literal["gaussian", "zero"] = knob(
        "gaussian", doc="``gaussian`` (reference code) or ``zero`` (last core of B zero: starts at base)")


def tt_modes(n: int, max_mode: int) -> list[int]:
    """Factorise ``n`` into few modes, each <= ``max_mode`` where the primes allow
    (a prime above ``max_mode`` stays one mode): greedily pack prime factors, largest first."""
    primes, m, p = [], n, 2
    while p * p <= m:
        while m % p == 0:
            primes.append(p)
            m //= p
        p += 1
    if m > 1:
        primes.append(m)
    modes: list[int] = []
    for q in sorted(primes, reverse=True):
        # put q into the smallest mode that stays within max_mode, else open a new mode
        fits = [i for i, v in enumerate(modes) if v * q <= max_mode]
        if fits:
            i = min(fits, key=lambda i: modes[i])
            modes[i] *= q
        else:
            modes.append(q)
    return sorted(modes, reverse=True) or [1]


def tt_full(cores: nn.ParameterList | list[Tensor]) -> Tensor:
    """Contract cores ``(r_{k-1}, n_k, r_k)`` into the full ``(n_1, ..., n_K)`` tensor."""
    out = cores[0]
    for c in cores[1:]:
        out = torch.tensordot(out, c.to(out.dtype), dims=([-1], [0]))  # autocast: mm may return bf16
    return out.squeeze(0).squeeze(-1)


def _train(modes: list[int], rank: int, std: float, dev, dtype) -> nn.ParameterList:
    ranks = [1] + [rank] * (len(modes) - 1) + [1]
    K = len(modes)
    return nn.ParameterList(
        nn.Parameter(torch.randn(ranks[k], n, ranks[k + 1], device=dev, dtype=dtype)
                     / math.sqrt(ranks[k + 1]) * std ** (1.0 / K))
        for k, n in enumerate(modes))


@register_method("loretta", LorettaConfig, paper="https://arxiv.org/abs/2402.11417",
                 description="LoRETTA_rep: LoRA factors written as tensor trains of small cores")
class LoRETTA(FactoredDelta):
    supported = (nn.Linear, Conv1D)

    def __init__(self, base: nn.Module, config: LorettaConfig, ctx: BuildContext | None = None):
        super().__init__()
        fan_in, fan_out = linear_shape(base, "LoRETTA")
        dev = next(base.parameters()).device
        dtype = param_dtype(base, config.adapter_dtype)
        r, mm = config.r, config.max_mode
        self.layout = layout(base)
        self.r, self.fan_in, self.fan_out = r, fan_in, fan_out
        self.scale = config.alpha / r
        self.modes_A = tt_modes(fan_in, mm) + tt_modes(r, mm)    # row-major view of A (in, r)
        self.modes_B = tt_modes(r, mm) + tt_modes(fan_out, mm)   # row-major view of B (r, out)
        self.cores_A = _train(self.modes_A, config.tt_rank, math.sqrt(1.0 / (fan_in + r)), dev, dtype)
        self.cores_B = _train(self.modes_B, config.tt_rank, math.sqrt(1.0 / (r + fan_out)), dev, dtype)
        if config.init == "zero":
            with torch.no_grad():
                self.cores_B[-1].zero_()

    def low_rank(self) -> tuple[Tensor, Tensor]:
        """LoRA-layout ``(A (r, in), B (out, r))`` from the two trains."""
        A = tt_full(self.cores_A).reshape(self.fan_in, self.r)     # (in, r)
        B = tt_full(self.cores_B).reshape(self.r, self.fan_out)    # (r, out)
        return A.t(), B.t()

    @classmethod
    def contract_config(cls, kind: str) -> LorettaConfig | None:
        return None if kind == "conv" else LorettaConfig(r=4, tt_rank=2, max_mode=4)
