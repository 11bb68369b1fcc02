"""Helpers for methods built from seeded random bases and shared banks, and for
methods whose delta is a dense ``(out, in)`` matrix of a Linear / Conv1D target.

Random bases (VeRA, NOLA, MoS index matrices) are *regenerated* from a seed kept in
the config, never saved: :mod:`deltakit.core.seeding` mixes the config seed with stable
keys (a target's path, a pool name), and :func:`seeded_uniform` draws on the CPU
so the same seed gives the same numbers on every device.
"""
from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from types import SimpleNamespace

import torch
from torch import Tensor, nn

from ..core.delta import WeightDelta
from ..core.registry import ConfigError
from ._base_ops import Conv1D, in_out
from .lora import LoRA, _cast, _dense, _down, _up

__all__ = ["seeded_uniform", "seeded_kaiming", "layout", "dense_from_factors",
           "low_rank_residual", "to_layout", "target_device", "linear_shape", "FactoredDelta"]


def seeded_uniform(shape: tuple[int, ...], bound: float, g: torch.Generator) -> Tensor:
    """U(-bound, bound) of ``shape`` drawn from the CPU generator ``g`` (device-independent)."""
    return (torch.rand(shape, generator=g, dtype=torch.float32) * 2 - 1) * bound


def seeded_kaiming(shape: tuple[int, ...], g: torch.Generator) -> Tensor:
    """``nn.init.kaiming_uniform_(t, a=sqrt(5))`` (nn.Linear's default, bound 1/sqrt(fan_in))
    with fan_in = ``shape[1]``, drawn from ``g``."""
    return seeded_uniform(shape, 1.0 / math.sqrt(shape[1]), g)


def layout(base: nn.Module) -> str:
    """How ``base`` stores its weight: ``conv1d`` (in, out), ``conv2d`` (out, in, kh, kw) or ``linear``."""
    if isinstance(base, nn.Conv2d):
        return "conv2d"
    return "conv1d" if isinstance(base, Conv1D) else "linear"


def linear_shape(base: nn.Module, method: str) -> tuple[int, int]:
    """(fan_in, fan_out) of a Linear / Conv1D target."""
    if not isinstance(base, (nn.Linear, Conv1D)):
        raise ConfigError(f"{method}: expected a Linear or Conv1D target, found {type(base).__name__}")
    return in_out(base)


def to_layout(dw: Tensor, kind: str) -> Tensor:
    """An ``(out, in[, kh, kw])`` dW in the weight layout ``kind`` (Conv1D stores (in, out))."""
    return dw.t() if kind == "conv1d" else dw


def dense_from_factors(A: Tensor, B: Tensor, kind: str, scale: float) -> Tensor:
    """``scale * B @ A`` (A: (r, in), B: (out, r)) in the weight layout ``kind`` (see :func:`layout`)."""
    return _dense(A, B, kind, scale)


def low_rank_residual(base: nn.Module, x: Tensor, A: Tensor, B: Tensor, scale: float) -> Tensor:
    """``scale * B(A(x))`` for a Linear / Conv1D target without forming ``B @ A``."""
    return _up(base, _down(base, _cast(x, A), A), B) * scale


def target_device(targets) -> torch.device:
    for m in targets.values():
        p = next(m.parameters(), None)
        if p is not None:
            return p.device
    return torch.device("cpu")


class FactoredDelta(WeightDelta):
    """A weight delta that is ``scale * B @ A`` of factors it composes itself (from banks,
    bases, shards, tensor trains). Subclasses implement :meth:`low_rank` and set
    ``self.layout`` (:func:`layout`) and ``self.scale``; dense dW, the fast residual, the
    batched mixed-adapter path (LoRA's own code) and :meth:`factors` (so task vectors
    keep the delta factored, as for LoRA) follow."""

    layout: str
    scale: float

    def low_rank(self) -> tuple[Tensor, Tensor]:
        """``(A (r, in), B (out, r))``."""
        raise NotImplementedError

    def factors(self) -> tuple[Tensor, Tensor, float, tuple[int, int]]:
        """``(B', A', s, shape)`` with ``dW = s * B' @ A'`` in the weight's layout (LoRA's
        protocol for :meth:`deltakit.Adapter.task_vector`); Conv1D stores (in, out)."""
        A, B = self.low_rank()
        if self.layout == "conv1d":
            return A.t(), B.t(), self.scale, (A.shape[1], B.shape[0])
        return B, A, self.scale, (B.shape[0], A.shape[1])

    def delta(self, base: Mapping[str, Tensor]) -> dict[str, Tensor]:
        A, B = self.low_rank()
        return {"weight": dense_from_factors(A, B, self.layout, self.scale)}

    def residual(self, base: nn.Module, x: Tensor) -> Tensor:
        A, B = self.low_rank()
        return low_rank_residual(base, x, A, B, self.scale)

    @classmethod
    def mixed_residual(cls, base: nn.Module, deltas: Sequence["FactoredDelta"], row: Tensor, x: Tensor,
                       into: Tensor | None = None) -> Tensor:
        return LoRA.mixed_residual(base, _views(deltas), row, x, into)

    @classmethod
    def routed_residual(cls, base: nn.Module, deltas: Sequence["FactoredDelta"], weights: Tensor, x: Tensor,
                        heads: int = 1) -> Tensor:
        return LoRA.routed_residual(base, _views(deltas), weights, x, heads)


def _views(deltas: Sequence["FactoredDelta"]) -> list[SimpleNamespace]:
    """LoRA's batched paths only read lora_A, lora_B, r and scale: hand them the composed factors."""
    views = []
    for d in deltas:
        A, B = d.low_rank()
        views.append(SimpleNamespace(lora_A=A, lora_B=B, r=A.shape[0], scale=d.scale))
    return views
