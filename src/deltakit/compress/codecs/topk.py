"""Magnitude top-k sparsification: keep the ``density`` fraction of entries largest in |dW|.

The kept values are stored in ``value_dtype`` (fp16 by default, divided by the power of two
just above their largest magnitude: :func:`stored_values`) and their positions by the
cheaper of a bitmask and Rice-coded gaps (:mod:`deltakit.compress._sparse`), so the file
costs about ``density * (16 + log2(1/density) + 2)`` bits per parameter. Exactly
``ceil(density * n)`` entries are kept; among entries tied at the threshold the lowest
positions win (``torch.topk`` leaves that choice to the implementation). Decoding is exact
for the kept entries up to ``value_dtype`` rounding; the error is the dropped tail:
``|dW - decode|_F^2 = sum of the smallest (1-density) n squared entries`` (plus rounding).
"""
from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Literal

import torch

from ...core.fields import Checked, knob
from ...taskvec import register_codec
from .._dtypes import dtype_name, dtype_of
from .._registry import CompressedValue, register_compressor
from .._sparse import decode_positions, encode_positions, position_bits

__all__ = ["TopKConfig", "Sparse", "topk"]


@register_codec("sparse")
class Sparse(CompressedValue):
    """``dW`` zero except at ``positions`` (flat, sorted), where it is ``values * scale``."""

    def __init__(self, positions: torch.Tensor, values: torch.Tensor, shape: tuple[int, ...],
                 dtype: torch.dtype, scale: float = 1.0):
        if positions.numel() != values.numel():
            raise ValueError(f"Sparse: expected one value per position, found {values.numel()} values "
                             f"for {positions.numel()} positions")
        self.positions, self.values = positions.reshape(-1), values.reshape(-1)
        self._shape, self._dtype, self.scale = tuple(int(s) for s in shape), dtype, float(scale)
        self._parts: tuple[dict[str, torch.Tensor], dict[str, Any]] | None = None

    shape = property(lambda self: self._shape)
    dtype = property(lambda self: self._dtype)

    @property
    def density(self) -> float:
        return self.values.numel() / max(1, self.numel)

    def to_dense(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        work = torch.float64 if torch.float64 in (self._dtype, dtype) else torch.float32
        out = torch.zeros(self.numel, dtype=work, device=self.values.device)
        out[self.positions.to(out.device)] = self.values.to(work) * self.scale
        return out.reshape(self._shape).to(dtype or self._dtype)

    def _index(self) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
        if self._parts is None:
            self._parts = encode_positions(self.positions, self.numel)
        return self._parts

    def tensors(self) -> dict[str, torch.Tensor]:
        return {"values": self.values, **self._index()[0]}

    def meta(self) -> dict[str, Any]:
        return {"shape": list(self._shape), "dtype": dtype_name(self._dtype), "scale": self.scale,
                **self._index()[1]}

    @classmethod
    def from_tensors(cls, tensors: Mapping[str, torch.Tensor], meta: Mapping[str, Any]) -> Sparse:
        pos = decode_positions(dict(tensors), dict(meta))
        return cls(pos, tensors["values"], tuple(meta["shape"]), dtype_of(meta["dtype"]), meta.get("scale", 1.0))

    def scaled(self, c: float) -> Sparse:
        return Sparse(self.positions, self.values, self._shape, self._dtype, self.scale * float(c))


@dataclass(frozen=True)
class TopKConfig(Checked):
    density: float = knob(0.1, gt=0, le=1, log=True, doc="fraction of entries kept (the largest |dW|)")
    value_dtype: Literal["float16", "bfloat16", "float32"] = knob("float16", doc="dtype of the kept values")


def kept_count(density: float, n: int) -> int:
    """``ceil(density * n)``, without float noise pushing an exact product up (0.3 * 10 is 3.0000000000000004)."""
    return min(n, math.ceil(round(density * n, 6)))


def _bits(cfg: TopKConfig, shape: tuple[int, ...]) -> float:
    n = math.prod(shape)
    k = kept_count(cfg.density, n)
    return (k * dtype_of(cfg.value_dtype).itemsize * 8 + position_bits(k, n)) / n


def stored_values(x: torch.Tensor, value_dtype: str) -> tuple[torch.Tensor, float]:
    """``(x / 2^e in value_dtype, 2^e)`` with ``max |x / 2^e|`` in ``(1/2, 1]``.

    Fine-tuning deltas are often around 1e-5, where fp16 is subnormal (relative error 0.2 %
    at 1e-5, 2 % at 1e-6) and a large entry can overflow it; normalising by a power of two
    keeps fp16's full precision relative to the largest entry, and the division is exact."""
    m = float(x.abs().max()) if x.numel() else 0.0
    if not 0 < m < math.inf:
        return x.to(dtype_of(value_dtype)), 1.0
    scale = 2.0 ** math.ceil(math.log2(m))
    return (x / scale).to(dtype_of(value_dtype)), scale


def keep_largest(dw: torch.Tensor, density: float) -> torch.Tensor:
    """Sorted flat positions of the ``ceil(density * n)`` entries largest in magnitude.

    Ties at the threshold go to the lowest positions, so the kept set is the same on every
    machine and torch version (``torch.topk``'s choice among ties is not specified)."""
    mag = dw.detach().reshape(-1).abs()
    mag = mag if mag.dtype == torch.float64 else mag.float()
    n = mag.numel()
    k = kept_count(density, n)
    if k in (0, n):
        return torch.arange(k, device=mag.device)
    thr = mag.kthvalue(n - k + 1).values                   # the k-th largest magnitude, O(n)
    keep = mag > thr
    ties = torch.nonzero(mag == thr, as_tuple=True)[0][: k - int(keep.sum())]
    keep[ties] = True
    return torch.nonzero(keep, as_tuple=True)[0]


@register_compressor("topk", config=TopKConfig, paper="magnitude pruning (e.g. Yadav et al. 2023, TIES' trim)",
                     bits=_bits)
def topk(dw: torch.Tensor, cfg: TopKConfig) -> Sparse:
    """keep the largest-magnitude entries, values in fp16, positions Rice-coded"""
    pos = keep_largest(dw, cfg.density)
    vals, scale = stored_values(dw.detach().reshape(-1)[pos], cfg.value_dtype)
    return Sparse(pos, vals, tuple(dw.shape), dw.dtype, scale)
