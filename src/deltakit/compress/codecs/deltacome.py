"""Delta-CoMe: mixed-precision SVD of the delta, more bits for larger singular values.

Ping et al. 2024, "Delta-CoMe: Training-Free Delta-Compression with Mixed-Precision for Large
Language Models" (NeurIPS 2024, arXiv 2406.08903; code github.com/thunlp/Delta-CoMe).
With ``dW = U diag(S) Vh`` (S descending) the rank components are cut into consecutive
bands; band ``j`` keeps ``k_j`` components whose singular vectors take ``schedule[j]``-bit
codes, and the tail past the last band is dropped:

    dW ~ sum_j U_j diag(S_j) Vh_j,   U_j, Vh_j quantised at schedule[j] bits, S in fp32.

Allocation (the paper's and its ``run.sh``): 8-bit for the top 2 components, 3-bit for the
next 32, 2-bit for as many as the budget leaves (968 / 1428 for 7B attention / MLP matrices
at 1/16 of fp16, i.e. 1 bit per parameter). Here ``band_ranks`` gives the sizes of every
band but the last, ``schedule`` the widths, and the last band takes what ``bits`` per
parameter (or ``ratio``: ``bits = 32 / ratio``, against fp32) leaves. Bands are filled in
order: a band the budget can't hold in full takes what fits, then the remaining budget
goes to the next (narrower) band; once every component is kept the value is smaller than
the budget. One component of a band of width b costs
``b (out + in) + (ceil(out/g) + ceil(in/g)) * scale bits (x2 asymmetric) + 32`` bits,
so the plan (and ``bits(cfg, shape)``) is known from the shape alone (the plan ignores the
codes' byte padding: it may exceed the budget by under 2 bytes per band). Neither ``bits``
nor ``ratio`` given: 1 bit per parameter, the paper's headline setting.

Quantiser: round-to-nearest per group along each singular vector (:mod:`.quant`;
``|err| <= s/2`` per entry, asymmetric by default as in the official code).
Deliberate differences from the paper / official code:

- no GPTQ: the official code quantises U and V with GPTQ (act-order, calibration data,
  groups of 128 along the factor's rows); here there is no data, so plain round-to-nearest
  (the error is larger than GPTQ's at 2-3 bits);
- groups run along each singular vector (a unit vector, one scale per ``group_size``
  entries of it), not along the r columns of the factor, so a band of 2 components is not
  charged one scale per 2 entries;
- the scales are counted in bits per parameter (the paper's "1/16" counts the codes only).

The paper's 8/3/2 schedule assumes GPTQ at 2-3 bits; with round-to-nearest the 3-bit and
2-bit bands cost more error (on a 512x512 power-law spectrum at 1/8 of fp32, relative
error 0.34 with (8, 3, 2) against 0.18 with ``schedule=(8, 4, 3), band_ranks=(8, 32)``).

Error: ``|dW - decode|_F <= sqrt(sum_{dropped} S_i^2) + sum_{kept} S_i (|e_u| + |e_v| + |e_u||e_v|)``
with ``e_u, e_v`` each vector's quantisation error (per entry at most half its group's scale).
1-D deltas (biases, norms) are quantised dense at ``schedule[0]`` bits (a ``quant`` value).
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from ...core.fields import ConfigError, knob
from ...taskvec import LowRank
from .._registry import register_compressor
from .quant import (GroupKnobs, Quantized, QuantConfig, QuantLowRank, bands_bits, quant, quant_bits, quantize_bands,
                    vector_bits)
from .svd import SvdMethod, spectrum

__all__ = ["DeltaComeConfig", "deltacome", "plan_bands", "DEFAULT_BITS"]

DEFAULT_BITS = 1.0


@dataclass(frozen=True)
class DeltaComeConfig(SvdMethod, GroupKnobs):
    bits: float | None = knob(None, gt=0, log=True, doc=f"target bits per parameter (none of bits/ratio: "
                                                        f"{DEFAULT_BITS}, the paper's 1/16 of fp16)")
    ratio: float | None = knob(None, gt=0, log=True, doc="target size ratio against fp32: bits = 32 / ratio")
    schedule: tuple[int, ...] = knob((8, 3, 2), ge=2, le=8, doc="code width of each band, largest singular values first")
    band_ranks: tuple[int, ...] = knob((2, 32), ge=0, doc="components in every band but the last (which fills the budget)")
    group_size: int = 128
    symmetric: bool = False

    def validate(self) -> None:
        if self.bits is not None and self.ratio is not None:
            raise ConfigError(f"DeltaComeConfig: expected at most one of bits / ratio, found bits={self.bits} "
                              f"and ratio={self.ratio}")
        if not self.schedule or len(self.band_ranks) != len(self.schedule) - 1:
            raise ConfigError(f"DeltaComeConfig: expected len(band_ranks) = len(schedule) - 1, found "
                              f"{len(self.band_ranks)} band ranks for schedule {self.schedule}")

    @property
    def target_bits(self) -> float:
        return 32.0 / self.ratio if self.ratio is not None else (self.bits or DEFAULT_BITS)


def plan_bands(cfg: DeltaComeConfig, shape: tuple[int, ...]) -> list[tuple[int, int]]:
    """``[(components, bits), ...]`` per band for a delta of ``shape`` within the budget."""
    out, inn = shape[0], math.prod(shape[1:])
    budget, left = cfg.target_bits * out * inn, min(out, inn)
    plan = []
    for j, bits in enumerate(cfg.schedule):
        cap = cfg.band_ranks[j] if j < len(cfg.band_ranks) else left
        cost = vector_bits(out, inn, bits, cfg)
        k = max(0, min(cap, left, int(budget // cost)))
        plan.append((k, bits))
        budget, left = budget - k * cost, left - k
    return plan


def _dense_cfg(cfg: DeltaComeConfig) -> QuantConfig:
    return QuantConfig(group_size=cfg.group_size, symmetric=cfg.symmetric, scale_dtype=cfg.scale_dtype,
                       bits=cfg.schedule[0])


def _bits(cfg: DeltaComeConfig, shape: tuple[int, ...]) -> float:
    """Bits per parameter of the planned bands, as stored."""
    if len(shape) == 1:
        return quant_bits(_dense_cfg(cfg), shape)
    out, inn = shape[0], math.prod(shape[1:])
    return bands_bits(out, inn, plan_bands(cfg, shape), cfg) / (out * inn)


@register_compressor("deltacome", config=DeltaComeConfig, paper="Ping et al. 2024, arXiv 2406.08903", bits=_bits)
def deltacome(dw: torch.Tensor | LowRank, cfg: DeltaComeConfig) -> QuantLowRank | Quantized:
    """SVD with mixed precision: 8/3/2-bit bands of singular vectors, tail dropped"""
    shape = tuple(dw.shape)
    if len(shape) == 1:
        return quant(dw, _dense_cfg(cfg))
    plan = plan_bands(cfg, shape)
    u, s, vh = spectrum(dw, cfg, sum(k for k, _ in plan), None)
    return quantize_bands(u, s, vh, plan, cfg, shape, dw.dtype)
