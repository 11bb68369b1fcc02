"""Where the kept entries of a sparse delta are: the cheaper of a bitmask and Rice-coded gaps.

A set of ``k`` positions among ``n`` costs ``n`` bits as a bitmask, and about
``k * (log2(n / k) + 2)`` bits as Golomb-Rice coded gaps (what ComPEFT counts). Both are
stored exactly and the smaller is chosen per tensor; the layout is vectorised both ways:

- ``none`` / ``all``: no positions (``k = 0``) or every one (``k = n``), no parts;
- ``mask``: one bit per entry (:func:`~deltakit.compress._bits.pack_signs` order);
- ``rice``: gaps ``g_i = p_i - p_{i-1} - 1`` (``p_{-1} = -1``) split as ``g = q * 2**b + r``;
  the remainders ``r`` are ``b``-bit codes, the quotients a unary stream (``q`` ones, then a
  zero), so decoding is a cumulative sum, not a bit-by-bit loop.

>>> parts, meta = encode_positions(torch.tensor([0, 3, 4, 9]), 10)
>>> meta["index"], decode_positions(parts, meta).tolist()
('mask', [0, 3, 4, 9])
"""
from __future__ import annotations

import math
from typing import Any

import torch

from ._bits import pack, packed_bytes, unpack

__all__ = ["encode_positions", "decode_positions", "position_bits"]


def _rice_b(n: int, k: int) -> int:
    """Rice parameter for gaps of mean about ``n / k`` (Gallager-van Voorhis' near-optimal choice)."""
    mean = max(1.0, n / max(1, k) - 1)
    return max(0, int(math.floor(math.log2(mean * math.log(2))))) if mean > 1 else 0


def _rice_bits(gaps: torch.Tensor, b: int) -> int:
    return int((gaps >> b).sum()) + gaps.numel() * (b + 1)


def position_bits(k: int, n: int) -> float:
    """Expected index bits for ``k`` random positions among ``n`` (planning estimate, not the stored size).

    Gaps of positions kept with probability ``p = k / n`` are geometric, ``P(g >= m) = (1-p)^m``,
    so the unary quotients ``floor(g / 2^b)`` have mean ``r / (1 - r)`` with ``r = (1-p)^(2^b)``:
    ``k (b + 1 + r / (1 - r))`` bits (within about 1 % of the stored size for random positions;
    ``mean_gap / 2^b`` instead of ``r / (1 - r)`` overestimates by 4-8 %)."""
    if k in (0, n):
        return 0.0
    b = _rice_b(n, k)
    r = math.exp(2 ** b * math.log1p(-k / n)) if k < n else 0.0
    return min(float(n), k * (b + 1 + r / (1 - r)))


def encode_positions(pos: torch.Tensor, n: int) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """``(parts, meta)`` for sorted, distinct positions ``pos`` in ``[0, n)``."""
    pos = pos.reshape(-1).to(torch.int64).cpu()
    k = pos.numel()
    if k and (int(pos[0]) < 0 or int(pos[-1]) >= n or bool((pos[1:] <= pos[:-1]).any())):
        raise ValueError(f"expected sorted distinct positions in [0, {n}), found {pos[:8].tolist()}...")
    if k in (0, n):                         # e.g. a frozen tensor's all-zero delta; density 1
        return {}, {"index": "none" if k == 0 else "all", "k": k, "n": n}
    gaps = torch.diff(pos, prepend=torch.tensor([-1])) - 1
    b = _rice_b(n, k)
    if _rice_bits(gaps, b) < n:
        q, r = gaps >> b, gaps & ((1 << b) - 1)
        ends = torch.cumsum(q + 1, 0) - 1                      # where each quotient's zero sits
        unary = torch.ones(int(ends[-1]) + 1, dtype=torch.uint8)
        unary[ends] = 0
        parts = {"unary": pack(unary, 1)}
        if b:
            parts["rem"] = pack(r, b)
        return parts, {"index": "rice", "k": k, "n": n, "b": b}
    mask = torch.zeros(n, dtype=torch.uint8)
    mask[pos] = 1
    return {"mask": pack(mask, 1)}, {"index": "mask", "k": k, "n": n}


def decode_positions(parts: dict[str, torch.Tensor], meta: dict[str, Any]) -> torch.Tensor:
    """The positions :func:`encode_positions` stored, int64, sorted."""
    k, n = int(meta["k"]), int(meta["n"])
    if meta["index"] in ("none", "all"):
        return torch.arange(k if meta["index"] == "all" else 0, dtype=torch.int64)
    if meta["index"] == "mask":
        return torch.nonzero(unpack(parts["mask"], 1, n), as_tuple=True)[0]
    if meta["index"] != "rice":
        raise ValueError(f"expected a position index 'mask', 'rice', 'none' or 'all', found {meta['index']!r}")
    b = int(meta["b"])
    nbits = parts["unary"].numel() * 8
    unary = unpack(parts["unary"], 1, nbits)
    ends = torch.nonzero(unary == 0, as_tuple=True)[0][:k]
    if ends.numel() != k:
        raise ValueError(f"expected {k} coded gaps, found {ends.numel()}: the index is truncated")
    q = torch.diff(ends, prepend=torch.tensor([-1])) - 1
    r = unpack(parts["rem"], b, k).to(torch.int64) if b else torch.zeros(k, dtype=torch.int64)
    return torch.cumsum((q << b) + r + 1, 0) - 1


def index_bytes(parts: dict[str, torch.Tensor]) -> int:
    return sum(t.numel() for t in parts.values())
