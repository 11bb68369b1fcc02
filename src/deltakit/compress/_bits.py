"""Exact bit packing: ``bits``-wide unsigned codes (1-32 bits), back to back in uint8 bytes.

Sizes on disk are what the papers' bits/param claims are checked against, so a 1-bit sign
takes one bit and a 4-bit code half a byte: nothing is stored as a whole byte "for now".
Codes are packed little-end first (code ``i`` starts at bit ``i * bits``); a width that does
not divide 8 (3, 5, 6, 7 bits) straddles byte boundaries the same way.

>>> codes = torch.tensor([1, 0, 3, 2, 1], dtype=torch.uint8)
>>> packed = pack(codes, 2)
>>> packed.tolist(), packed.numel()
([177, 1], 2)
>>> unpack(packed, 2, 5).tolist()
[1, 0, 3, 2, 1]
"""
from __future__ import annotations

import torch

__all__ = ["pack", "unpack", "packed_bytes", "pack_signs", "unpack_signs"]


def packed_bytes(n: int, bits: int) -> int:
    """Bytes that ``n`` codes of ``bits`` bits take once packed."""
    return (n * bits + 7) // 8


def _check_bits(bits: int) -> None:
    if not (isinstance(bits, int) and 1 <= bits <= 32):
        raise ValueError(f"expected a code width of 1-32 bits, found {bits!r}")


def pack(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """Pack a tensor of integer codes in ``[0, 2**bits)`` (flattened) into uint8 bytes."""
    _check_bits(bits)
    flat = codes.reshape(-1)
    if flat.numel() and (int(flat.min()) < 0 or int(flat.max()) >= 1 << bits):
        raise ValueError(f"expected codes in [0, {1 << bits}) for {bits}-bit packing, "
                         f"found [{int(flat.min())}, {int(flat.max())}]")
    n = flat.numel()
    # one bit per row, then 8 bits per output byte: exact for every width, O(n * bits) memory
    shifts = torch.arange(bits, device=flat.device)
    bitplane = ((flat.to(torch.int64).unsqueeze(1) >> shifts) & 1).reshape(-1).to(torch.uint8)
    pad = packed_bytes(n, bits) * 8 - bitplane.numel()
    if pad:
        bitplane = torch.cat([bitplane, bitplane.new_zeros(pad)])
    weights = (1 << torch.arange(8, device=flat.device)).to(torch.int32)
    return (bitplane.reshape(-1, 8).to(torch.int32) * weights).sum(1).to(torch.uint8)


def unpack(packed: torch.Tensor, bits: int, n: int) -> torch.Tensor:
    """The first ``n`` codes of :func:`pack`'s output: uint8 for widths up to 8 bits, else int64."""
    _check_bits(bits)
    if packed.dtype != torch.uint8 or packed.numel() < packed_bytes(n, bits):
        raise ValueError(f"expected at least {packed_bytes(n, bits)} uint8 bytes for {n} {bits}-bit codes, "
                         f"found {packed.numel()} {packed.dtype}")
    shifts = torch.arange(8, device=packed.device)
    bitplane = ((packed.reshape(-1).to(torch.int32).unsqueeze(1) >> shifts) & 1).reshape(-1)[: n * bits]
    weights = 1 << torch.arange(bits, device=packed.device, dtype=torch.int64)
    codes = (bitplane.reshape(n, bits).to(torch.int64) * weights).sum(1)
    return codes.to(torch.uint8) if bits <= 8 else codes


def pack_signs(x: torch.Tensor) -> torch.Tensor:
    """One bit per entry: 1 where ``x >= 0`` (zero counts as positive; callers mask zeros apart)."""
    return pack((x.reshape(-1) >= 0).to(torch.uint8), 1)


def unpack_signs(packed: torch.Tensor, n: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """``+1`` / ``-1`` for the first ``n`` bits of :func:`pack_signs`."""
    return unpack(packed, 1, n).to(dtype) * 2 - 1
