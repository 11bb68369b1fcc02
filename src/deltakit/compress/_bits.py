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

import numpy as np
import torch

__all__ = ["pack", "unpack", "packed_bytes", "pack_signs", "unpack_signs"]


def packed_bytes(n: int, bits: int) -> int:
    """Bytes that ``n`` codes of ``bits`` bits take once packed."""
    return (n * bits + 7) // 8


def _check_bits(bits: int) -> None:
    if not (isinstance(bits, int) and 1 <= bits <= 32):
        raise ValueError(f"expected a code width of 1-32 bits, found {bits!r}")


def _bitplane(flat: torch.Tensor, bits: int) -> torch.Tensor:
    """Code ``i``'s bit ``j`` at index ``i * bits + j``, as uint8 0/1 (the stream order on disk)."""
    if bits == 1:
        return flat.to(torch.uint8)
    work = torch.uint8 if bits <= 8 else torch.int64
    shifts = torch.arange(bits, device=flat.device, dtype=work)
    return ((flat.to(work).unsqueeze(1) >> shifts) & 1).to(torch.uint8).reshape(-1)


def pack(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """Pack a tensor of integer codes in ``[0, 2**bits)`` (flattened) into uint8 bytes."""
    _check_bits(bits)
    flat = codes.reshape(-1)
    host = flat.cpu().numpy()                      # numpy's integer min/max are much faster than torch's
    if host.size and (int(host.min()) < 0 or int(host.max()) >= 1 << bits):
        raise ValueError(f"expected codes in [0, {1 << bits}) for {bits}-bit packing, "
                         f"found [{int(host.min())}, {int(host.max())}]")
    # numpy's packbits does the 8-bits-per-byte step in C (little bit order = our stream order)
    packed = np.packbits(_bitplane(flat, bits).cpu().numpy(), bitorder="little")
    return torch.from_numpy(packed).to(flat.device)


def unpack(packed: torch.Tensor, bits: int, n: int) -> torch.Tensor:
    """The first ``n`` codes of :func:`pack`'s output: uint8 for widths up to 8 bits, else int64."""
    _check_bits(bits)
    if packed.dtype != torch.uint8 or packed.numel() < packed_bytes(n, bits):
        raise ValueError(f"expected at least {packed_bytes(n, bits)} uint8 bytes for {n} {bits}-bit codes, "
                         f"found {packed.numel()} {packed.dtype}")
    raw = np.unpackbits(packed.reshape(-1).cpu().numpy(), count=n * bits, bitorder="little")
    bitplane = torch.from_numpy(raw).to(packed.device)
    if bits == 1:
        return bitplane
    work = torch.int32 if bits <= 8 else torch.int64
    weights = 1 << torch.arange(bits, device=packed.device, dtype=work)
    codes = (bitplane.reshape(n, bits).to(work) * weights).sum(1)
    return codes.to(torch.uint8) if bits <= 8 else codes.to(torch.int64)


def pack_signs(x: torch.Tensor) -> torch.Tensor:
    """One bit per entry: 1 where ``x >= 0`` (zero counts as positive; callers mask zeros apart)."""
    return pack((x.reshape(-1) >= 0).to(torch.uint8), 1)


def unpack_signs(packed: torch.Tensor, n: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """``+1`` / ``-1`` for the first ``n`` bits of :func:`pack_signs`."""
    return unpack(packed, 1, n).to(dtype) * 2 - 1
