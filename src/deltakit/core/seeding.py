"""Seeded random generators derived from ``(seed, keys)``: the one place a seed becomes numbers.

Several methods regenerate frozen random tensors at load time from the seed kept in the
adapter's config (VeRA, NOLA, MoS, intrinsic projections, sparse_random masks, LoRA-FA,
Tied-LoRA), and DARE draws its drop masks per tensor name. Each draw has its own
``torch.Generator`` (never the global RNG: threads, and a caller's own seeding, must not
change the numbers), seeded from the config seed plus stable keys (a module path, a pool
name, a basis index) so the numbers do not depend on the order targets are built in.

The adapters saved by every release must keep giving the same outputs, so how a seed and
its keys become a 64-bit generator seed is a *scheme*, named at each call site and never
changed once released (``tests/core/test_saved_adapters.py`` loads files written before
this module existed; ``tests/core/test_seeding.py`` pins every scheme's numbers). A new
derivation is a new scheme name, not an edit. The schemes, all with ``crc32`` (stable
across processes, unlike Python's ``hash``) and ``M = 1_000_003``:

* ``"path"`` - ``(seed * M + crc32("|".join(keys))) mod 2**63``. With one key this is the
  derivation of sparse_random, intrinsic, LoRA-FA / Tied-LoRA (``seeded_init``) and DARE
  as first released; the default for new code.
* ``"joined"`` - ``(seed * M + crc32("|".join((seed, *keys)))) mod (2**63 - 1)``. NOLA's
  bases and MoS's shard indices as first released (the ``derived_seed`` of ``_banks``).
  It differs from ``"path"`` in both the hashed text and the modulus: both are kept
  because files exist for each.
* ``"raw"`` - the seed itself, no keys. VeRA (peft draws its shared matrices from
  ``projection_prng_key`` directly, and both libraries must regenerate the same ones),
  prompt tuning's init and NOLA's coefficient init.

Numbers are drawn on the CPU unless ``device`` says otherwise: a CPU generator gives the
same numbers on every machine, a CUDA one does not match it.

>>> g = generator(42, "layers.0.q")                       # scheme "path"
>>> round(torch.rand(1, generator=g).item(), 6)
0.627381
"""
from __future__ import annotations

import zlib
from typing import Literal, get_args

import torch

__all__ = ["Scheme", "SCHEMES", "derive_seed", "generator"]

Scheme = Literal["path", "joined", "raw"]
SCHEMES: tuple[str, ...] = get_args(Scheme)

_M = 1_000_003


def _crc(parts: tuple[object, ...]) -> int:
    return zlib.crc32("|".join(str(p) for p in parts).encode())


def derive_seed(seed: int, *keys: object, scheme: Scheme = "path") -> int:
    """The generator seed of ``(seed, keys)`` under ``scheme`` (see the module docstring)."""
    if scheme == "path":
        return (int(seed) * _M + _crc(keys)) % 2**63
    if scheme == "joined":
        return (int(seed) * _M + _crc((seed, *keys))) % (2**63 - 1)
    if scheme == "raw":
        if keys:
            raise ValueError(f"seed scheme 'raw': expected no keys, found {list(keys)}")
        return int(seed)
    raise ValueError(f"seed scheme: expected one of {list(SCHEMES)}, found {scheme!r}")


def generator(seed: int, *keys: object, scheme: Scheme = "path",
              device: torch.device | str = "cpu") -> torch.Generator:
    """A fresh ``torch.Generator`` on ``device`` seeded from ``(seed, keys)`` under ``scheme``."""
    return torch.Generator(device=device).manual_seed(derive_seed(seed, *keys, scheme=scheme))
