"""Shape plumbing shared by methods: how each supported module type applies a weight.

A weight delta is stored in the layout of the module it targets: ``(out, in)`` for
``nn.Linear``, ``(in, out)`` for GPT-2's ``Conv1D``, ``(out, in, kh, kw)`` for
``nn.Conv2d``, ``(num_embeddings, dim)`` for ``nn.Embedding``.
"""
from __future__ import annotations

import itertools
import sys

import torch
from torch import nn

from ..core.packed import PackedLinear


class _LazyConv1DMeta(type):
    """isinstance / issubclass against transformers' ``Conv1D`` without importing
    transformers (half a second): a Conv1D object can only exist once its module is loaded."""

    @staticmethod
    def _real():
        mod = sys.modules.get("transformers.pytorch_utils")
        return getattr(mod, "Conv1D", None)

    def __instancecheck__(cls, obj) -> bool:
        real = cls._real()
        return real is not None and isinstance(obj, real)

    def __subclasscheck__(cls, sub) -> bool:
        real = cls._real()
        return real is not None and issubclass(sub, real)


class Conv1D(metaclass=_LazyConv1DMeta):
    """GPT-2's transposed linear layer (``transformers.pytorch_utils.Conv1D``), for type checks."""

__all__ = ["Conv1D", "in_out", "LINEAR_LIKE", "device_of"]

LINEAR_LIKE = (nn.Linear, Conv1D)


def in_out(base: nn.Module) -> tuple[int, int]:
    """(fan_in, fan_out) of a supported module."""
    if isinstance(base, (nn.Linear, PackedLinear)):
        return base.in_features, base.out_features
    if isinstance(base, Conv1D):
        return base.weight.shape[0], base.weight.shape[1]
    if isinstance(base, nn.Conv2d):
        return base.in_channels, base.out_channels
    if isinstance(base, nn.Embedding):
        return base.num_embeddings, base.embedding_dim
    raise TypeError(f"expected Linear, Conv1D, Conv2d, Embedding or PackedLinear, found {type(base).__name__}")


def device_of(base: nn.Module) -> torch.device:
    """Where a module lives: its first parameter's device, else its first buffer's (a packed
    linear without bias holds only buffers)."""
    t = next(itertools.chain(base.parameters(), base.buffers()), None)
    if t is None:
        raise TypeError(f"expected a module with parameters or buffers, found an empty {type(base).__name__}")
    return t.device
