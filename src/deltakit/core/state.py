"""One state object per model, and the per-call context.

What persists (DESIGN.md, "Model state and call context"):

* :class:`ModelState` - which adapters exist (attach order), which are active, which
  are merged (merge order), and the ``requires_grad`` flags the base had before the
  first attach. One object per model; every :class:`~deltakit.core.layer.DeltaLayer`
  of the model holds a reference to it and never keeps a copy of any of it.

What varies per call lives in a :class:`contextvars.ContextVar`, so that many threads
(a server) run one model at once, each with its own routing:

* ``disabled(model)``: no unmerged delta applies;
* ``mixed_batch(model, rows)``: batch row ``i`` uses adapter ``rows[i]``;
* ``routed(model, names, weights)``: each row or token mixes adapters ``names`` with soft
  weights, fixed or computed per layer from the layer's input (Arrow).

A context value maps a model state's id to its :class:`Call`; entering a block sets a
new mapping and leaving it resets the token, so nesting restores the outer block's
settings exactly, and a thread never sees another thread's settings (each thread runs in
its own context; ``contextvars.copy_context().run`` shares one on purpose). While no block
is open in any thread (a process-wide count), a forward does not read the ContextVar at all:
``torch.compile`` cannot trace ``ContextVar.get``, and that read made every adapted layer a
graph break. Code that restores a saved context after its block closed (gradient
checkpointing's recompute) holds :func:`scopes_open` meanwhile, or the routing is not read.

Changes to the persistent state (attach, detach, merge, unmerge, set_active) wait for the
model's forwards in flight to finish, and forwards wait for a change in progress: the
model's root forward holds the state's :class:`ForwardGuard` for reading (hooks installed
at the first attach), a change holds it for writing. A change made from inside a forward of
the same thread (a callback) is allowed rather than deadlocking.
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

__all__ = ["ModelState", "Call", "Routing", "call_scope", "ForwardGuard"]


@dataclass(frozen=True)
class Routing:
    """Soft weights over adapters ``names`` (K of them) for one call.

    ``weights``: a tensor ``(B, K)`` (per row) or ``(B, T, K)`` (per token), with a trailing
    ``heads`` axis when ``heads > 1`` (multi-head routing: each adapter's rank splits into
    ``heads`` equal blocks, each weighted on its own); or a callable ``fn(layer, x)`` that a
    layer calls with its input and that returns such a tensor over all K names, for routers
    that decide per layer from the hidden state (Arrow). The weights are not normalised here.
    """

    names: tuple[str, ...]
    weights: Any
    heads: int = 1


@dataclass(frozen=True)
class Call:
    """Per-call settings of one model. ``rows``: ``(names, index (B,))``, -1 = the base;
    ``routing``: soft weights over adapters (:class:`Routing`)."""

    disabled: bool = False
    rows: tuple[tuple[str, ...], Tensor] | None = None
    routing: Routing | None = None


_NO_CALL = Call()
# call scopes open right now, in all threads: while 0, ModelState.call() skips the ContextVar
_OPEN_SCOPES = 0
_OPEN_LOCK = threading.Lock()
_CALLS: contextvars.ContextVar[MappingProxyType] = contextvars.ContextVar(
    "deltakit_calls", default=MappingProxyType({}))


class ForwardGuard:
    """Many forwards at once, or one state change: a readers-writer lock, re-entrant per thread."""

    def __init__(self) -> None:
        self._cond = threading.Condition(threading.Lock())
        self._readers: dict[int, int] = {}   # thread id -> nesting depth
        self._writer: int | None = None
        self._depth = 0

    def acquire_read(self) -> None:
        me = threading.get_ident()
        with self._cond:
            while self._writer not in (None, me):
                self._cond.wait()
            self._readers[me] = self._readers.get(me, 0) + 1

    def release_read(self) -> None:
        me = threading.get_ident()
        with self._cond:
            if self._readers.get(me, 0) <= 1:
                self._readers.pop(me, None)
                self._cond.notify_all()
            else:
                self._readers[me] -= 1

    @contextlib.contextmanager
    def writing(self) -> Iterator[None]:
        me = threading.get_ident()
        with self._cond:
            while self._writer not in (None, me) or any(t != me for t in self._readers):
                self._cond.wait()
            self._writer, self._depth = me, self._depth + 1
        try:
            yield
        finally:
            with self._cond:
                self._depth -= 1
                if self._depth == 0:
                    self._writer = None
                    self._cond.notify_all()


@dataclass(eq=False)
class ModelState:
    """The persistent adapter state of one model (see the module docstring)."""

    adapters: dict[str, Any] = field(default_factory=dict)   # name -> Adapter, attach order
    active: tuple[str, ...] = ()
    merged: tuple[str, ...] = ()                              # merge order
    requires_grad: dict[str, bool] = field(default_factory=dict)
    guard: ForwardGuard = field(default_factory=ForwardGuard, repr=False)

    def __getstate__(self) -> dict:  # copy.deepcopy / pickle of a model: a fresh guard, not a copy
        return {k: v for k, v in self.__dict__.items() if k != "guard"}

    def __setstate__(self, d: dict) -> None:
        self.__dict__.update(d, guard=ForwardGuard())

    def changing(self):
        """Hold while changing the persistent state (waits for forwards in flight)."""
        return self.guard.writing()

    # Root-model hooks. Bound methods, so a deep copy of the model calls its own state's;
    # found again by owner on removal (hook handles would point into the original's dicts).
    def install(self, model) -> None:
        model.register_forward_pre_hook(self.enter_forward)
        model.register_forward_hook(self.exit_forward, always_call=True)

    def uninstall(self, model) -> None:
        for hooks in (model._forward_pre_hooks, model._forward_hooks):
            for k in [k for k, h in hooks.items() if getattr(h, "__self__", None) is self]:
                del hooks[k]
                model._forward_hooks_always_called.pop(k, None)

    def enter_forward(self, module, args) -> None:
        self.guard.acquire_read()

    def exit_forward(self, module, args, output) -> None:
        self.guard.release_read()

    def live(self, present) -> list[str]:
        """Active, unmerged adapter names among ``present`` (a layer's deltas), in active order."""
        return [n for n in self.active if n in present and n not in self.merged]

    def call(self) -> Call:
        # No call scope open in any thread: nothing to look up. A plain int read, which
        # torch.compile traces (it cannot trace ContextVar.get: a graph break per layer).
        if not _OPEN_SCOPES:
            return _NO_CALL
        return _CALLS.get().get(id(self), _NO_CALL)


@contextlib.contextmanager
def scopes_open() -> Iterator[None]:
    """Count as an open call scope for the block: for code that sets ``_CALLS`` another way
    (gradient checkpointing replaying a forward's context variables in backward)."""
    global _OPEN_SCOPES
    with _OPEN_LOCK:
        _OPEN_SCOPES += 1
    try:
        yield
    finally:
        with _OPEN_LOCK:
            _OPEN_SCOPES -= 1


@contextlib.contextmanager
def call_scope(state: ModelState, **changes) -> Iterator[Call]:
    """Within the block (this thread / context only), ``state``'s call settings get ``changes``."""
    global _OPEN_SCOPES
    calls = _CALLS.get()
    new = replace(calls.get(id(state), _NO_CALL), **changes)
    with _OPEN_LOCK:  # counted before the context is set: a forward inside the block sees it
        _OPEN_SCOPES += 1
    token = _CALLS.set(MappingProxyType({**calls, id(state): new}))
    try:
        yield new
    finally:
        _CALLS.reset(token)
        with _OPEN_LOCK:
            _OPEN_SCOPES -= 1
