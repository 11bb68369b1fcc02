"""One state object per model, and the per-call context.

What persists (DESIGN.md, "Model state and call context"):

* :class:`ModelState` - which adapters exist (attach order), which are active, which
  are merged (merge order), and the ``requires_grad`` flags the base had before the
  first attach. One object per model; every :class:`~deltakit.core.layer.DeltaLayer`
  of the model holds a reference to it and never keeps a copy of any of it.

What varies per call lives in a :class:`contextvars.ContextVar`, so that many threads
(a server) run one model at once, each with its own routing:

* ``disabled(model)``: no unmerged delta applies;
* ``mixed_batch(model, rows)``: batch row ``i`` uses adapter ``rows[i]``.

A context value maps a model state's id to its :class:`Call`; entering a block sets a
new mapping and leaving it resets the token, so nesting restores the outer block's
settings exactly, and a thread never sees another thread's settings (each thread runs in
its own context; ``contextvars.copy_context().run`` shares one on purpose).
Changes to the persistent state take the state's lock.
"""
from __future__ import annotations

import contextlib
import contextvars
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field, replace
from types import MappingProxyType
from typing import Any

from torch import Tensor

__all__ = ["ModelState", "Call", "call_scope"]


@dataclass(frozen=True)
class Call:
    """Per-call settings of one model. ``rows``: ``(names, index (B,))``, -1 = the base."""

    disabled: bool = False
    rows: tuple[tuple[str, ...], Tensor] | None = None


_NO_CALL = Call()
_CALLS: contextvars.ContextVar[MappingProxyType] = contextvars.ContextVar(
    "deltakit_calls", default=MappingProxyType({}))


@dataclass(eq=False)
class ModelState:
    """The persistent adapter state of one model (see the module docstring)."""

    adapters: dict[str, Any] = field(default_factory=dict)   # name -> Adapter, attach order
    active: tuple[str, ...] = ()
    merged: tuple[str, ...] = ()                              # merge order
    requires_grad: dict[str, bool] = field(default_factory=dict)
    lock: threading.RLock = field(default_factory=threading.RLock, repr=False)

    def __getstate__(self) -> dict:  # copy.deepcopy / pickle of a model: a fresh lock, not a copy
        return {k: v for k, v in self.__dict__.items() if k != "lock"}

    def __setstate__(self, d: dict) -> None:
        self.__dict__.update(d, lock=threading.RLock())

    def live(self, present) -> list[str]:
        """Active, unmerged adapter names among ``present`` (a layer's deltas), in active order."""
        return [n for n in self.active if n in present and n not in self.merged]

    def call(self) -> Call:
        return _CALLS.get().get(id(self), _NO_CALL)


@contextlib.contextmanager
def call_scope(state: ModelState, **changes) -> Iterator[Call]:
    """Within the block (this thread / context only), ``state``'s call settings get ``changes``."""
    calls = _CALLS.get()
    new = replace(calls.get(id(state), _NO_CALL), **changes)
    token = _CALLS.set(MappingProxyType({**calls, id(state): new}))
    try:
        yield new
    finally:
        _CALLS.reset(token)
