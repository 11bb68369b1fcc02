"""The serving engine: one scheduler thread owns the model and runs continuous batching.

Requests wait in a bounded queue (:class:`QueueFull` when it is full, which the API turns into
429). Between decode steps the scheduler drops finished, cancelled and timed-out rows, admits
newcomers up to ``max_batch`` (prefilled together, then merged into the running batch's cache:
:mod:`._rows`), and runs one decode forward for every row. Rows of different adapters share each
forward through :func:`deltakit.mixed_batch`, so the batched adapter path of the methods does
the per-row work. Only the scheduler thread touches the model (forwards, attaching and
detaching adapters through :class:`~deltakit.serve.residency.Residency`); other threads talk to
it through :meth:`Engine.submit` / :meth:`Engine.cancel` and each request's ``sink`` callback.

Prefetch (``prefetch=N``): on each submission and each step the engine names the adapters of
the first ``N`` queued requests to :meth:`Residency.prefetch`, which reads those only on disk
into host copies on its own thread; admission then only attaches. While a request's adapter is
still being read and other rows are running, it waits at the head of the queue (nothing behind
it overtakes) instead of stalling their decode step; with no rows running it waits for the read.

Not yet: the newcomers' prefill is its own forward before the decode step (not fused with it,
as chunked prefill would), so a long prompt delays the running rows by one prefill. And the
attach itself stays on the scheduler thread: prefetch takes the file read and sha256 off it
(SmolLM2, page-cached files, load ~12 on 2 cores, medians of 18: a rank-16 LoRA's admission
179 -> 135 ms, rank 64 320 -> 243 ms; ``bench/serve_prefetch.py``), while building the deltas
(with a random init that the copy then overwrites), the finite and target checks and the copy
remain, and dominate on a fast disk.

Greedy rows take the argmax; sampled rows draw with :func:`deltakit.train.generate.sample_top_p`
from their own generator seeded as ``generate_ids`` seeds a lone prompt, so a request's tokens
do not depend on which other requests share its batch (greedy and seeded sampling both equal
the request decoded alone, tested).

>>> engine = Engine(model, eos_token_ids=[2], pad_token_id=0)           # doctest: +SKIP
>>> engine.start(); engine.submit(Request(prompt=[5, 6], max_tokens=4, sink=print))  # doctest: +SKIP
"""
from __future__ import annotations

import itertools
import math
import secrets
import threading
import time
from collections import deque
from collections.abc import Callable, Sequence
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Literal

import torch
from torch import Tensor, nn

from ..core.adapter import disabled, mixed_batch
from ..core.seeding import generator
from ..train.generate import _forward, _left_pad, sample_top_p
from ._rows import Rows, check_cache

__all__ = ["Engine", "Request", "Event", "Limits", "QueueFull", "EngineClosed"]

Reason = Literal["stop", "length", "cancelled", "timeout", "error"]


class QueueFull(RuntimeError):
    """The waiting queue holds ``max_queue`` requests already: try again later (HTTP 429)."""


class EngineClosed(RuntimeError):
    """The engine is shutting down and takes no new requests (HTTP 503)."""


@dataclass(frozen=True)
class Limits:
    """Bounds that keep one client from taking the server: rows per forward, waiting requests,
    tokens per request, prompt tokens, and seconds from submission to the last token."""

    max_batch: int = 8
    max_queue: int = 64
    max_tokens: int = 256
    max_prompt: int = 1024
    timeout: float = 120.0

    def __post_init__(self) -> None:
        for k in ("max_batch", "max_queue", "max_tokens", "max_prompt"):
            if getattr(self, k) < 1:
                raise ValueError(f"expected {k} >= 1, found {getattr(self, k)}")
        if not self.timeout > 0:
            raise ValueError(f"expected timeout > 0 seconds, found {self.timeout}")


@dataclass(frozen=True)
class Event:
    """What a request's sink receives: each new token, then exactly one ``done`` (with the
    finish reason) or ``error``."""

    kind: Literal["token", "done", "error"]
    token: int | None = None
    reason: Reason | None = None
    error: BaseException | None = None


_ids = itertools.count()


@dataclass(eq=False)
class Request:
    """One generation. ``adapter``: the attached adapter name (None: the base). ``temperature``
    0 decodes greedily. ``sink`` is called from the scheduler thread and must not block."""

    prompt: Sequence[int]
    max_tokens: int
    sink: Callable[[Event], None]
    adapter: str | None = None
    temperature: float = 0.0
    top_p: float = 1.0
    seed: int | None = None
    timeout: float | None = None
    id: int = field(default_factory=lambda: next(_ids))
    tokens: list[int] = field(default_factory=list)
    cancelled: bool = False
    finished: Reason | None = None
    deadline: float = math.inf
    rng: torch.Generator | None = None


class Engine:
    """Continuous batching over one model; see the module docstring."""

    def __init__(self, model: nn.Module, *, eos_token_ids: Sequence[int], pad_token_id: int,
                 limits: Limits | None = None, residency=None, context_length: int | None = None,
                 prefetch: int = 0):
        if prefetch < 0:
            raise ValueError(f"expected a prefetch depth >= 0 (queued requests looked ahead at), found {prefetch}")
        self.model = model.eval()
        self.prefetch = prefetch
        self.eos = frozenset(int(t) for t in eos_token_ids)
        self.pad = int(pad_token_id)
        self.limits = limits or Limits()
        self.residency = residency
        self.context_length = context_length
        self.device = next(model.parameters()).device
        self._queue: deque[Request] = deque()
        self._cv = threading.Condition()
        self._reqs: list[Request] = []       # the running rows, in batch order (scheduler thread only)
        self._rows: Rows | None = None
        self._admitting: list[Request] = []  # popped from the queue, not yet in the batch
        self._calls: deque[tuple[Callable[[], object], Future]] = deque()
        self._closing = False
        self._drain = True
        self._thread: threading.Thread | None = None
        self.failure: BaseException | None = None

    # ------------------------------------------------------------------ other threads
    def check(self, req: Request) -> None:
        """Raise ValueError (HTTP 400) when ``req`` breaks a limit."""
        lim, n = self.limits, len(req.prompt)
        if n < 1 or n > lim.max_prompt:
            raise ValueError(f"expected a prompt of 1 to {lim.max_prompt} tokens, found {n}")
        if not 1 <= req.max_tokens <= lim.max_tokens:
            raise ValueError(f"expected max_tokens between 1 and {lim.max_tokens}, found {req.max_tokens}")
        if self.context_length and n + req.max_tokens > self.context_length:
            raise ValueError(f"prompt ({n} tokens) + max_tokens ({req.max_tokens}) exceeds the model's context "
                             f"length {self.context_length}")
        if req.temperature < 0 or not 0 < req.top_p <= 1:
            raise ValueError(f"expected temperature >= 0 and 0 < top_p <= 1, found {req.temperature}, {req.top_p}")

    def submit(self, req: Request) -> None:
        """Queue ``req``; raises ValueError (bad request), QueueFull or EngineClosed. The engine
        owns ``req``'s residency pin from here: a refused request gives it back at once."""
        try:
            self._enqueue(req)
        except Exception:
            if self.residency is not None and req.adapter is not None:
                self.residency.release(req.adapter)
            raise
        self._prefetch()

    def _prefetch(self) -> None:
        """Name the adapters of the first ``prefetch`` queued requests to the residency, which
        starts reading those only on disk (any thread; the reads run on the residency's own)."""
        if not self.prefetch or self.residency is None:
            return
        with self._cv:
            keys = [r.adapter for r in itertools.islice(self._queue, self.prefetch) if r.adapter is not None]
        self.residency.prefetch(keys)

    def _enqueue(self, req: Request) -> None:
        self.check(req)
        req.deadline = time.monotonic() + (req.timeout or self.limits.timeout)
        if req.temperature > 0:
            req.rng = generator(secrets.randbits(62) if req.seed is None else req.seed, "generate", 0)
        with self._cv:
            if self._closing:
                raise EngineClosed("the server is shutting down")
            if len(self._queue) >= self.limits.max_queue:
                raise QueueFull(f"{len(self._queue)} requests are waiting (the limit); retry later")
            self._queue.append(req)
            self._cv.notify()

    def cancel(self, req: Request) -> None:
        """Stop ``req`` at the next step boundary (a client went away)."""
        req.cancelled = True
        with self._cv:
            self._cv.notify()

    def wake(self) -> None:
        """Let the scheduler run its housekeeping now (e.g. an unload to carry out)."""
        with self._cv:
            self._cv.notify()

    def call(self, fn: Callable[[], object]) -> Future:
        """Run ``fn`` on the scheduler thread between steps (it may touch the model: load an
        adapter now, for instance); the future holds its result or exception."""
        fut: Future = Future()
        with self._cv:
            if self._closing and self._thread is not None and not self._thread.is_alive():
                raise EngineClosed("the server has stopped")
            self._calls.append((fn, fut))
            self._cv.notify()
        return fut

    @property
    def queue_depth(self) -> int:
        return len(self._queue)

    @property
    def alive(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    @property
    def running(self) -> int:
        return len(self._reqs)

    # ------------------------------------------------------------------ lifecycle
    def start(self) -> Engine:
        if self._thread is None:
            self._thread = threading.Thread(target=self._loop, name="deltakit-scheduler", daemon=True)
            self._thread.start()
        return self

    def close(self, *, drain: bool = True, timeout: float | None = None) -> None:
        """Take no new requests; with ``drain`` finish the queued and running ones first, else
        cancel them. Returns when the scheduler thread has stopped (or ``timeout`` passed)."""
        with self._cv:
            self._closing, self._drain = True, drain
            if not drain:
                for r in [*self._queue, *self._reqs]:
                    r.cancelled = True
            self._cv.notify()
        if self._thread is not None:
            self._thread.join(timeout)
        if self.prefetch and self.residency is not None and not self.alive:
            self.residency.close()

    def _loop(self) -> None:
        while True:
            with self._cv:
                if not self._queue and not self._reqs and not self._calls:
                    if self._closing:
                        break
                    self._cv.wait(timeout=0.25)
            try:
                self.step()
            except Exception as e:  # a bug or a broken model: fail the rows, keep serving
                self.failure = e
                self._fail_all(e)

    def _fail_all(self, e: BaseException) -> None:
        """Every request the scheduler holds (running, being admitted, waiting) gets the error."""
        with self._cv:
            waiting, self._queue = list(self._queue), deque()
        for r in [*self._reqs, *self._admitting, *waiting]:
            self._finish(r, "error", e)
        self._reqs, self._rows, self._admitting = [], None, []

    # ------------------------------------------------------------------ scheduler thread
    def step(self) -> bool:
        """One scheduling round: reap, admit and prefill newcomers, one decode step.
        Returns whether any request was worked on (tests drive the engine with it)."""
        self._run_calls()
        self._reap()
        new = self._admitting = self._admit()
        self._prefetch()
        if new:
            self._prefill(new)
        self._admitting = []
        if self._reqs:
            self._decode()
        if self.residency is not None:
            self.residency.trim()
        return bool(new or self._reqs)

    def _run_calls(self) -> None:
        while self._calls:
            with self._cv:
                fn, fut = self._calls.popleft()
            if not fut.set_running_or_notify_cancel():
                continue
            try:
                fut.set_result(fn())
            except Exception as e:
                fut.set_exception(e)

    def _reap(self) -> None:
        now = time.monotonic()
        gone = {r.id: ("cancelled" if r.cancelled else "timeout") for r in self._reqs
                if r.cancelled or now > r.deadline}
        if gone:
            keep = [i for i, r in enumerate(self._reqs) if r.id not in gone]
            for r in self._reqs:
                if r.id in gone:
                    self._finish(r, gone[r.id])
            self._keep(keep)

    def _admit(self) -> list[Request]:
        """Pop waiting requests into the free rows; each gets its adapter attached first."""
        new: list[Request] = []
        now = time.monotonic()
        while len(self._reqs) + len(new) < self.limits.max_batch:
            with self._cv:
                if not self._queue:
                    break
                r = self._queue[0]
                if self._reading(r) and not (r.cancelled or now > r.deadline):
                    break  # its adapter lands in a step or two; the running rows go on meanwhile
                self._queue.popleft()
            if self._ready(r, now):
                new.append(r)
        return new

    def _ready(self, r, now: float) -> bool:
        """Admit ``r`` (a generation or a classification request): finish it as cancelled, timed
        out or failed (its adapter would not attach) and say False, else attach its adapter."""
        if r.cancelled or now > r.deadline:
            self._finish(r, "cancelled" if r.cancelled else "timeout")
            return False
        try:
            if self.residency is not None and r.adapter is not None:
                self.residency.ensure(r.adapter)
        except Exception as e:
            self._finish(r, "error", e)
            return False
        return True

    def _reading(self, r: Request) -> bool:
        """Whether admitting ``r`` now would stall running rows on its adapter's prefetch read."""
        return (bool(self._reqs) and self.residency is not None and r.adapter is not None
                and self.residency.loading(r.adapter))

    @torch.no_grad()
    def _prefill(self, new: list[Request]) -> None:
        ids, mask = _left_pad([list(r.prompt) for r in new], self.pad, self.device)
        pos = (mask.cumsum(-1) - 1).clamp(min=0)                     # (B, T), as generate() derives them
        with self._scope(new):
            logits, cache = _forward(self.model, ids, mask, pos, None)
        check_cache(cache)
        toks = self._pick(logits, new)
        rows = Rows(cache, mask, pos[:, -1] + 1, torch.tensor(toks, device=self.device))
        keep = [i for i, (r, t) in enumerate(zip(new, toks)) if not self._emit(r, t)]
        if not keep:
            return
        if len(keep) < len(new):
            rows.keep(keep)
        if self._rows is None:
            self._rows = rows
        else:
            self._rows.join(rows)
        self._reqs += [new[i] for i in keep]

    @torch.no_grad()
    def _decode(self) -> None:
        rows = self._rows
        ids, mask, pos = rows.step_inputs()
        with self._scope(self._reqs):
            logits, rows.cache = _forward(self.model, ids, mask, pos, rows.cache)
        rows.pos = rows.pos + 1
        toks = self._pick(logits, self._reqs)
        rows.last = torch.tensor(toks, device=self.device)
        keep = [i for i, (r, t) in enumerate(zip(self._reqs, toks)) if not self._emit(r, t)]
        if len(keep) < len(self._reqs):
            self._keep(keep)

    def _keep(self, keep: list[int]) -> None:
        if not keep:
            self._reqs, self._rows = [], None
            return
        self._rows.keep(keep)
        self._reqs = [self._reqs[i] for i in keep]

    def _scope(self, reqs: Sequence[Request]):
        rows = [r.adapter for r in reqs]
        if all(a is None for a in rows):
            return disabled(self.model)
        return mixed_batch(self.model, rows)

    def _pick(self, logits: Tensor, reqs: Sequence[Request]) -> list[int]:
        """Each row's next token: argmax, or a top-p draw from the request's own generator."""
        toks = logits.argmax(-1)
        for i, r in enumerate(reqs):
            if r.temperature > 0:
                u = torch.rand((1,), generator=r.rng, dtype=torch.float64).to(logits.device)
                toks[i] = sample_top_p(logits[i:i + 1], u, r.temperature, r.top_p)[0]
        return toks.tolist()

    def _emit(self, r: Request, tok: int) -> bool:
        """Hand ``tok`` to ``r``; True when ``r`` is finished (EOS, which is not emitted, or max_tokens)."""
        if tok in self.eos:
            self._finish(r, "stop")
            return True
        r.tokens.append(tok)
        _deliver(r, Event("token", token=tok))
        if len(r.tokens) >= r.max_tokens:
            self._finish(r, "length")
            return True
        return False

    def _finish(self, r: Request, reason: Reason, error: BaseException | None = None) -> None:
        if r.finished is not None:  # already answered (a failure after its last token)
            return
        r.finished = reason
        if self.residency is not None and r.adapter is not None:
            self.residency.release(r.adapter)
        _deliver(r, Event("error", reason=reason, error=error) if error is not None else Event("done", reason=reason))


def _deliver(r: Request, ev: Event) -> None:
    """A sink that fails (its event loop closed: the client is gone) cancels its request
    rather than stopping the scheduler."""
    try:
        r.sink(ev)
    except Exception:
        r.cancelled = True

