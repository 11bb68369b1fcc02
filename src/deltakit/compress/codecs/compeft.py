"""ComPEFT: keep the top-k entries of ``dW`` by magnitude, then only their signs and one scale.

Yadav et al. 2023, "ComPEFT: Compression for Communicating Parameter Efficient Updates via
Sparsification and Quantization" (https://arxiv.org/abs/2311.13171)::

    decode = alpha * sigma * sign(dW) * m,   m = 1 on the k = ceil(density * n) largest |dW|
    sigma  = std(dW)                          (the unbiased std of the whole delta, ``tv.std()``)

so the delta becomes ternary ``{-s, 0, +s}``. Storage (:class:`SignSparse`): one sign bit per
kept entry, the positions as the cheaper of a bitmask and Rice (Golomb) coded gaps, and one
fp32 scale ``s = alpha * sigma``: about ``density * (1 + log2(1 / density) + 2)`` bits per
parameter plus 32 bits per tensor (0.59 at density 0.1, 0.96 at 0.2 on a 512 x 512 matrix).

Error: ``|dW - decode|_F^2 = sum of the dropped (smallest) squares + sum_kept (|dW_i| - s)^2``.
The second term is smallest at ``s = mean(|dW_i|, kept)`` (the L2-optimal scale); the paper
instead tunes ``alpha`` on each task's validation data.

Knobs and defaults, and where we differ from the official code
(``prateeky2806/compeft``, ``src/bert_eval.py``, ``compress_and_update_parms``):

- ``density`` 0.2 is the official script's default (``--k 20``). ``alpha``: the paper sweeps it
  per task on validation data; the script's default is ``--replace_factor 1.0``. Our default is
  ``alpha=None``, the L2-optimal scale ``s = mean |kept dW|`` (i.e. ``alpha = s / sigma``,
  about 1.75 for a Gaussian delta at density 0.2), because a codec has no validation data: on a
  MiniLM delta fine-tuned on SST-2 (36 matrices) it kept dev accuracy within 0.2 / 0.9 / 3.2
  points of the uncompressed delta at density 0.2 / 0.1 / 0.05, where ``alpha = 1`` lost
  2.5 / 6.9 / 12.2. Give ``alpha`` to get the paper's ``alpha * sigma``.
- ``sigma``: the official code flattens the *whole* task vector and takes one std (and one top-k)
  over all of it. A compressor sees one tensor, so by default ``sigma`` is this tensor's std and
  top-k is per tensor; pass the task vector's global std as ``sigma`` to get the paper's scale
  (top-k stays per tensor, at the same density everywhere).
- Exactly ``ceil(density * n)`` entries are kept (ties broken by position, as in ``topk``);
  the official ``|x| >= kth value`` keeps every entry tied at the threshold. Entries that are
  exactly zero are never kept (``sign(0) = 0`` in the official code too), so ``k`` may be smaller.

>>> v = compeft(torch.tensor([[0.5, -2.0, 3.0], [4.0, -0.25, 0.0]]), ComPeftConfig(density=0.5))
>>> v.positions.tolist(), v.scale, v.to_dense().tolist()
([1, 2, 3], 3.0, [[0.0, -3.0, 3.0], [3.0, 0.0, 0.0]])
"""
from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch

from ...core.fields import Checked, knob
from ...taskvec import register_codec
from .._bits import pack, packed_bytes, unpack
from .._dtypes import dtype_name, dtype_of
from .._registry import CompressedValue, register_compressor
from .._sparse import decode_positions, encode_positions, position_bits
from .topk import keep_largest, kept_count

__all__ = ["SignSparse", "ComPeftConfig", "compeft", "fp32"]


def fp32(x: float) -> float:
    """``x`` rounded to float32: what a stored fp32 scale gives back, so decode is bit-exact after a reload."""
    return float(torch.tensor(float(x), dtype=torch.float32))


@register_codec("signsparse")
class SignSparse(CompressedValue):
    """``dW`` zero except at ``positions`` (flat, sorted), where it is ``+scale`` or ``-scale``.

    Parts: ``signs`` (1 bit per kept entry, 1 = positive), the position index of
    :mod:`deltakit.compress._sparse`, and ``scale`` (one fp32).
    """

    def __init__(self, positions: torch.Tensor, positive: torch.Tensor, scale: float, shape: tuple[int, ...],
                 dtype: torch.dtype):
        if positions.numel() != positive.numel():
            raise ValueError(f"SignSparse: expected one sign per position, found {positive.numel()} signs "
                             f"for {positions.numel()} positions")
        self.positions, self.positive = positions.reshape(-1), positive.reshape(-1).to(torch.bool)
        self.scale, self._shape, self._dtype = fp32(scale), tuple(int(s) for s in shape), dtype
        self._index: tuple[dict[str, torch.Tensor], dict[str, Any]] | None = None

    shape = property(lambda self: self._shape)
    dtype = property(lambda self: self._dtype)

    @property
    def density(self) -> float:
        return self.positions.numel() / max(1, self.numel)

    def to_dense(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        work = torch.float64 if torch.float64 in (self._dtype, dtype) else torch.float32
        out = torch.zeros(self.numel, dtype=work, device=self.positions.device)
        s = torch.tensor(self.scale, dtype=work, device=out.device)
        out[self.positions] = torch.where(self.positive.to(out.device), s, -s)
        return out.reshape(self._shape).to(dtype or self._dtype)

    def _positions(self) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
        if self._index is None:
            self._index = encode_positions(self.positions, self.numel)
        return self._index

    def tensors(self) -> dict[str, torch.Tensor]:
        return {"signs": pack(self.positive.to(torch.uint8).cpu(), 1),
                "scale": torch.tensor([self.scale], dtype=torch.float32), **self._positions()[0]}

    def meta(self) -> dict[str, Any]:
        return {"shape": list(self._shape), "dtype": dtype_name(self._dtype), **self._positions()[1]}

    @classmethod
    def from_tensors(cls, tensors: Mapping[str, torch.Tensor], meta: Mapping[str, Any]) -> SignSparse:
        pos = decode_positions(dict(tensors), dict(meta))
        positive = unpack(tensors["signs"], 1, pos.numel()).to(torch.bool)
        return cls(pos, positive, float(tensors["scale"].reshape(-1)[0]), tuple(meta["shape"]),
                   dtype_of(meta["dtype"]))

    def scaled(self, c: float) -> SignSparse:
        return SignSparse(self.positions, self.positive, self.scale * float(c), self._shape, self._dtype)

    def norm(self) -> float:
        return abs(self.scale) * math.sqrt(self.positions.numel())


@dataclass(frozen=True)
class ComPeftConfig(Checked):
    density: float = knob(0.2, gt=0, le=1, log=True, doc="fraction of entries kept (the largest |dW|)")
    alpha: float | None = knob(None, gt=0, doc="scale = alpha * sigma (tuned per task in the paper); "
                                               "none: the L2-optimal mean |kept dW|")
    sigma: float | None = knob(None, gt=0, doc="std the scale multiplies; none: this tensor's std "
                                               "(the paper: the whole task vector's)")


def _plan_bits(cfg: ComPeftConfig, shape: tuple[int, ...]) -> float:
    """Bits per parameter if no kept entry is exactly zero (zeros are dropped, so an upper bound)."""
    n = math.prod(shape)
    k = kept_count(cfg.density, n)
    return (8 * packed_bytes(k, 1) + position_bits(k, n) + 32) / max(1, n)


def _sigma(x: torch.Tensor) -> float:
    """The unbiased std (``torch.std``, as the official code); 0 for a single entry."""
    return float(x.std()) if x.numel() > 1 else 0.0


@register_compressor("compeft", config=ComPeftConfig, paper="https://arxiv.org/abs/2311.13171", bits=_plan_bits)
def compeft(dw: torch.Tensor, cfg: ComPeftConfig) -> SignSparse:
    """top-k by magnitude, then signs only and one scale alpha*sigma: about 1 bit per kept entry plus its position"""
    work = torch.float64 if dw.dtype == torch.float64 else torch.float32
    x = dw.detach().reshape(-1).to(work)
    pos = keep_largest(x, cfg.density)
    pos = pos[x[pos] != 0]
    kept = x[pos]
    if cfg.alpha is None:
        scale = float(kept.abs().mean()) if kept.numel() else 0.0
    else:
        scale = cfg.alpha * (cfg.sigma if cfg.sigma is not None else _sigma(x))
    return SignSparse(pos, kept > 0, scale, tuple(dw.shape), dw.dtype)
