"""The delta protocol: a small module attached to ONE target of a frozen base.

Two kinds share it (see DESIGN.md):

* :class:`WeightDelta` re-parameterises the target's parameters, ``W -> W + dW``.
  It must say :meth:`WeightDelta.delta`, the dense ``dW`` for each parameter it
  changes, given the *original* base parameters. That one method makes it
  mergeable, a task vector, compressible. It may also offer a fast
  :meth:`WeightDelta.residual` (the term it adds to the base output, e.g. LoRA's
  ``s * B(A(x))``) so that the unmerged forward never forms ``dW``.
* :class:`ActivationDelta` wraps what the target computes:
  ``forward(inner, x, *args, **kwargs)`` where ``inner`` is the computation
  without this delta. Not mergeable.

Everything else (freezing, merging, saving, mixed batches, NaN checks) is written
once, over this protocol, in :mod:`deltakit.core.layer` and
:mod:`deltakit.core.adapter`.
"""
from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any, ClassVar, Literal

import torch
from torch import Tensor, nn

__all__ = ["Delta", "WeightDelta", "ActivationDelta", "BuildContext", "CACHE_PREFIX", "drop_caches"]

# Batched paths (mixed batches, routing) may keep tensors derived from several adapters'
# factors on the base module, e.g. stacked factors that decoding would otherwise rebuild at
# every step. They live in ``base.__dict__`` under keys with this prefix, so that ``detach``
# can drop them: a cache holding a detached adapter's factors would keep its memory alive.
CACHE_PREFIX = "_dk_cache_"


def drop_caches(module: nn.Module) -> None:
    """Forget every batched-path cache kept on ``module`` (see :data:`CACHE_PREFIX`)."""
    for k in [k for k in module.__dict__ if k.startswith(CACHE_PREFIX)]:
        del module.__dict__[k]


class BuildContext:
    """What a method may know about its target when building a delta."""

    __slots__ = ("name", "layer", "shared", "index")

    def __init__(self, name: str, layer: int | None, shared: nn.Module | None, index: int):
        self.name = name          # module path, e.g. "encoder.layer.3.attention.self.query"
        self.layer = layer        # block index parsed from the path, if any
        self.shared = shared      # the adapter's shared parameters (banks, bases), if any
        self.index = index        # position of this target among the adapter's targets


class Delta(nn.Module):
    """Base of every delta. Subclasses set :attr:`kind` and implement the hooks."""

    kind: ClassVar[Literal["weight", "activation"]]
    #: module types the method can attach to (checked before anything is built)
    supported: ClassVar[tuple[type, ...]] = ()

    @classmethod
    def supports(cls, base: nn.Module) -> bool:
        return isinstance(base, cls.supported) if cls.supported else True

    @classmethod
    def build_shared(cls, config: Any, targets: Mapping[str, nn.Module]) -> nn.Module | None:
        """Parameters shared by all of an adapter's deltas (banks, bases); None if none."""
        return None

    @classmethod
    def training_hooks(cls, adapter: Any, *, loader: Any = None,
                       total_steps: int | None = None) -> tuple[dict | None, list]:
        """What training needs beyond "optimise the trainable parameters":
        ``(params, callbacks)`` for :func:`deltakit.train.fit` - an explicit parameter set
        (None: the ``requires_grad`` ones) and objects with ``on_step(step, model)`` that
        also offer ``state_dict()`` / ``load_state_dict()`` (or declare ``stateless = True``),
        so a resumed run can restore them. Methods with rank schedules, layer sampling or
        data-driven masks override it."""
        return None, []

    def adopt_state(self, state: Mapping[str, Tensor]) -> None:
        """Before a saved state is loaded into this freshly built delta (keys as its own
        ``state_dict()``): take the shapes that training chose and the config cannot say, e.g. a
        mask of data-chosen size (LT-SFT). Default: nothing (shapes follow from the config)."""

    def extra_repr(self) -> str:
        return f"kind={self.kind}"


class WeightDelta(Delta):
    kind: ClassVar[Literal["weight"]] = "weight"
    #: True when ``delta`` depends on the base values (DoRA, IA3, OFT...), not only shapes
    weight_dependent: ClassVar[bool] = False

    def delta(self, base: Mapping[str, Tensor]) -> dict[str, Tensor]:
        """Dense ``dW`` per changed parameter name, from the original base parameters."""
        raise NotImplementedError

    def factors(self) -> tuple[Tensor, Tensor, float, tuple[int, ...]] | None:
        """``(B, A, scale, shape)`` with ``dW = scale * (B @ A).reshape(shape)`` when the delta
        is low-rank by construction (LoRA family), so task vectors keep it factored; None
        otherwise (the default), and then ``delta`` gives the dense ``dW``."""
        return None

    # Optional fast path. When a subclass defines ``residual(self, base, x)`` the
    # layer computes ``base(x) + residual``; otherwise it runs the base with
    # ``W + dW`` through ``torch.func.functional_call``.
    residual: ClassVar[Callable[..., Tensor] | None] = None

    # Optional batched path for rows that use different adapters of this method
    # (classmethod ``mixed_residual(base, deltas, row_index, x, into=None)``: the residual, or
    # with ``into`` (the base output) ``into + residual``, which it may add in place).
    mixed_residual: ClassVar[Callable[..., Tensor] | None] = None

    # Optional batched path for soft routing over adapters of this method (classmethod
    # ``routed_residual(base, deltas, weights, x, heads)``, weights ``(..., K[, heads])``
    # broadcast over ``x``'s leading dims); without it a routed layer sums each adapter's
    # output change, weighted.
    routed_residual: ClassVar[Callable[..., Tensor] | None] = None


class ActivationDelta(Delta):
    kind: ClassVar[Literal["activation"]] = "activation"

    def forward(self, inner: Callable[..., Any], x: Tensor, *args, **kwargs) -> Any:  # noqa: D401
        raise NotImplementedError

    # Optional batched path for a mixed batch whose adapters on this layer are all of
    # this method: classmethod ``mixed_forward(inner, deltas, row, x, *args, **kwargs)``
    # with ``row`` (B,) indexing ``deltas`` or -1 (base). Needed when per-row sub-batches
    # cannot be recombined, e.g. methods that change the sequence length or share a
    # key/value cache object across rows (prompt / prefix tuning).
    mixed_forward: ClassVar[Callable[..., Any] | None] = None


def param_dtype(base: nn.Module, override: str | None) -> torch.dtype:
    """dtype for new delta parameters: fp32 under a half-precision base unless told otherwise."""
    if override not in (None, "auto"):
        return getattr(torch, override)
    p = next(base.parameters(), None)
    if p is None or not p.is_floating_point():
        return torch.float32
    return torch.float32 if p.dtype in (torch.float16, torch.bfloat16) else p.dtype
