"""LoKr: low-rank Kronecker product (LyCORIS; after KronA, Edalati et al., 2022)
https://arxiv.org/abs/2212.10650

    dW = s * kron(lokr_w1, lokr_w2),   lokr_w2 = lokr_w2_a @ lokr_w2_b  (optional low rank)
    out = out_l * out_k,  in = in_m * in_n:  w1: (out_l, in_m),  w2: (out_k, in_n[, kh, kw])

The split of ``out`` and ``in`` follows LyCORIS's ``factorization(dim, factor)``:
with ``factor=-1`` the two factors are as close to sqrt(dim) as divisibility allows;
with ``factor=f > 0`` the smaller factor is at most ``f`` (exactly ``f`` when it
divides). The smaller ``w1`` is a full matrix (low rank too with ``decompose_both``).
Unless ``full_matrix``, the larger ``w2`` is low rank (``w2_a (out_k, r) @ w2_b (r,
in_n[*kh*kw])``) when ``r < max(out_k, in_n) / 2``, as in LyCORIS, else full. Conv2d:
the kernel lives in w2 (``w1`` is broadcast as ``(out_l, in_m, 1, 1)``). Scale:
``alpha / r`` when a factor is low rank, 1 when both are full (LyCORIS; peft uses
alpha / r always). Init (peft's LoKr): w1 (or w1_a) zero, the rest kaiming-uniform,
so the model starts at the base.

>>> import torch, deltakit as dk
>>> m = torch.nn.Sequential(torch.nn.Linear(16, 8))
>>> ad = dk.attach(m, dk.get_method("lokr").config(r=1, targets=["0"]))
>>> sorted((k.split(".")[-1], tuple(p.shape)) for k, p in ad.named_parameters())
[('lokr_w1', (2, 4)), ('lokr_w2_a', (4, 1)), ('lokr_w2_b', (1, 4))]
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

__all__ = ["LokrConfig", "LoKr", "factorization"]


@dataclass(frozen=True)
class LokrConfig(DeltaConfig):
    """LoKr hyper-parameters."""

    r: int = knob(
        8, ge=1, log=True, doc="rank of the low-rank form of the larger Kronecker factor (and of w1 with "
                               "``decompose_both``)")
    alpha: float = knob(
        8.0, gt=0, log=True, doc="scale numerator (scale = alpha / r when a factor is low rank, else 1)")
    factor: int = knob(
        -1, ge=-1, doc="``-1``: split each dim as close to sqrt as possible; ``f > 0``: the smaller factor of"
                       " each dim is at most ``f``")
    decompose_both: bool = knob(False, doc="also write w1 as a low-rank product when it is large enough")
    full_matrix: bool = knob(False, doc="keep both factors full whatever ``r`` (LyCORIS's ``full_matrix``)")

    def validate(self) -> None:
        if self.factor == 0:
            raise ConfigError(f"LokrConfig.factor: expected -1 or a positive integer, found {self.factor!r}")


def factorization(dim: int, factor: int = -1) -> tuple[int, int]:
    """``(m, n)`` with ``m * n == dim`` and ``m <= n`` (LyCORIS's rule, see module docstring)."""
    if factor > 0 and dim % factor == 0:
        m, n = factor, dim // factor
        return (m, n) if m <= n else (n, m)
    limit = dim if factor < 0 else factor
    m, n = 1, dim
    # walk up the divisors of dim while the pair gets more balanced and m stays <= limit
    cand = m + 1
    while cand <= math.isqrt(dim):
        if dim % cand == 0:
            if cand > limit:
                break
            m, n = cand, dim // cand
        cand += 1
    return m, n


@register_method("lokr", LokrConfig, paper="https://arxiv.org/abs/2212.10650",
                 description="Kronecker product of a small full factor and a low-rank factor (LyCORIS LoKr)")
class LoKr(WeightDelta):
    supported = (nn.Linear, Conv1D, nn.Conv2d)

    def __init__(self, base: nn.Module, config: LokrConfig, ctx: BuildContext | None = None):
        super().__init__()
        if isinstance(base, nn.Conv2d) and base.groups != 1:
            raise ConfigError(f"LoKr on grouped Conv2d is not supported (groups={base.groups})")
        fan_in, fan_out = in_out(base)
        self.layout = layout(base)
        kernel = tuple(base.kernel_size) if isinstance(base, nn.Conv2d) else ()
        out_l, out_k = factorization(fan_out, config.factor)
        in_m, in_n = factorization(fan_in, config.factor)
        dev = next(base.parameters()).device
        dtype = param_dtype(base, config.adapter_dtype)
        r = config.r

        def p(*shape):
            return nn.Parameter(torch.empty(shape, device=dev, dtype=dtype))

        self.w2_shape = (out_k, in_n, *kernel)
        self.low_rank_w1 = not config.full_matrix and config.decompose_both and r < max(out_l, in_m) / 2
        self.low_rank_w2 = not config.full_matrix and r < max(out_k, in_n) / 2
        if self.low_rank_w1:
            self.lokr_w1_a, self.lokr_w1_b = p(out_l, r), p(r, in_m)
            nn.init.zeros_(self.lokr_w1_a)
            nn.init.kaiming_uniform_(self.lokr_w1_b, a=math.sqrt(5))
        else:
            self.lokr_w1 = p(out_l, in_m)
            nn.init.zeros_(self.lokr_w1)
        if self.low_rank_w2:
            self.lokr_w2_a, self.lokr_w2_b = p(out_k, r), p(r, in_n * math.prod(kernel))
            nn.init.kaiming_uniform_(self.lokr_w2_a, a=math.sqrt(5))
            nn.init.kaiming_uniform_(self.lokr_w2_b, a=math.sqrt(5))
        else:
            self.lokr_w2 = p(*self.w2_shape)
            nn.init.kaiming_uniform_(self.lokr_w2, a=math.sqrt(5))
        # LyCORIS: scale 1 when neither factor is low rank (alpha would have nothing to balance)
        self.scale = config.alpha / r if (self.low_rank_w1 or self.low_rank_w2) else 1.0

    def delta(self, base: Mapping[str, Tensor]) -> dict[str, Tensor]:
        w1 = self.lokr_w1_a @ self.lokr_w1_b if self.low_rank_w1 else self.lokr_w1             # (out_l, in_m)
        w2 = (self.lokr_w2_a @ self.lokr_w2_b).reshape(self.w2_shape) if self.low_rank_w2 else self.lokr_w2
        if w2.dim() == 4:
            w1 = w1[:, :, None, None]       # the kernel dims come from w2 alone
        dw = torch.kron(w1, w2) * self.scale                                                   # (out, in[, kh, kw])
        return {"weight": to_layout(dw, self.layout)}
