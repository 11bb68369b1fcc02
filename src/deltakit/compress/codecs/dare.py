"""DARE: drop each entry of ``dW`` with probability ``p``, rescale the survivors by ``1 / (1 - p)``.

Yu et al. 2024, "Language Models are Super Mario" (https://arxiv.org/abs/2311.03099):
``m_i ~ Bernoulli(1 - p)``, ``decode = m * dW / (1 - p)``, so ``E[decode] = dW`` entry by
entry (unbiased). The price is variance, not bias: ``E |decode - dW|_F^2 = p / (1 - p) *
|dW|_F^2`` (relative error ``sqrt(p / (1 - p))``: 3.0 at p = 0.9); DARE works on models
because a layer sums many such errors, which average out, not because each matrix is close.

Stored as a :class:`~deltakit.compress.codecs.topk.Sparse` value: the kept entries of ``dW``
in ``value_dtype`` (fp16 by default, normalised by a power of two as ``topk`` does), the
rescale ``1 / (1 - p)`` folded into its ``scale``, positions as the cheaper of a bitmask and
Rice-coded gaps: about ``(1 - p) * (16 + log2(1 / (1 - p)) + 2)`` bits per parameter.

Where the randomness comes from: a compressor sees only ``(dW, cfg)``, so the tensor's
name reaches the mask through the ``key`` knob (the caller compressing a task vector sets
``key`` to each parameter's name). The drop mask is then ``torch.rand(n) < 1 - p`` from
``deltakit.core.seeding.generator(seed, key)`` (scheme ``"path"``): exactly the mask the
merge executor's ``random`` sparsifier (DARE-merge) draws for the first model of a merge with
the same seed, parameter name and density ``1 - p``. Without a ``key`` the key is derived from
the tensor's bytes (``"crc32:<hex>"``): different tensors get independent masks and the same
tensor the same mask on every run, whatever order tensors come in.

Where we differ from the official code: the mask is drawn from our own seeded generator, not
``torch.bernoulli`` on the global RNG (the numbers are reproducible, not those of the paper's
runs); positions are stored (the file does not depend on the RNG staying the same across torch
versions) instead of a dense masked tensor.

>>> v = dare(torch.tensor([[1.0, -2.0, 3.0], [4.0, 0.5, -6.0]]), DareConfig(p=0.5, key="w"))
>>> v.positions.tolist(), v.to_dense().tolist()
([2, 3, 4], [[0.0, 0.0, 6.0], [8.0, 1.0, 0.0]])
"""
from __future__ import annotations

import math
import zlib
from dataclasses import dataclass
from typing import Literal

import torch

from ...core.fields import Checked, knob
from ...core.seeding import generator
from .._dtypes import dtype_of
from .._registry import register_compressor
from .._sparse import position_bits
from .topk import Sparse, stored_values

__all__ = ["DareConfig", "dare", "drop_mask"]


@dataclass(frozen=True)
class DareConfig(Checked):
    p: float = knob(0.9, ge=0, lt=1, doc="drop probability of each entry (survivors are rescaled by 1/(1-p))")
    seed: int = knob(0, ge=0, doc="seed of the drop masks (with key: one reproducible stream per tensor)")
    key: str | None = knob(None, doc="the tensor's name, mixed into the seed; none: a hash of the tensor's bytes")
    value_dtype: Literal["float16", "bfloat16", "float32"] = knob("float16", doc="dtype of the kept values")


def _bits(cfg: DareConfig, shape: tuple[int, ...]) -> float:
    """Expected bits per parameter (the number kept is random: ``(1 - p) n`` on average)."""
    n = math.prod(shape)
    k = round((1 - cfg.p) * n)
    return (k * dtype_of(cfg.value_dtype).itemsize * 8 + position_bits(k, n)) / max(1, n)


def content_key(dw: torch.Tensor) -> str:
    """``"crc32:<hex>"`` of the tensor's bytes: a stable key for a tensor that has no name."""
    raw = dw.detach().reshape(-1).contiguous().cpu().view(torch.uint8).numpy()
    return f"crc32:{zlib.crc32(memoryview(raw)):08x}"


def drop_mask(dw: torch.Tensor, cfg: DareConfig) -> torch.Tensor:
    """Flat bool mask of the entries DARE keeps (``True`` with probability ``1 - p``)."""
    key = cfg.key if cfg.key is not None else content_key(dw)
    gen = generator(cfg.seed, key, scheme="path")
    return torch.rand(dw.numel(), generator=gen, dtype=torch.float32) < 1 - cfg.p


@register_compressor("dare", config=DareConfig, paper="https://arxiv.org/abs/2311.03099", bits=_bits)
def dare(dw: torch.Tensor, cfg: DareConfig) -> Sparse:
    """random drop with probability p, survivors rescaled by 1/(1-p): unbiased, seeded per tensor"""
    pos = torch.nonzero(drop_mask(dw, cfg), as_tuple=True)[0].to(dw.device)
    vals, norm = stored_values(dw.detach().reshape(-1)[pos], cfg.value_dtype)
    return Sparse(pos, vals, tuple(dw.shape), dw.dtype, scale=norm / (1.0 - cfg.p))
