"""The per-name job of a merge: read one parameter from K sources (and the base), merge it,
apply LiNeS. Both executors run it: :func:`merge_checkpoints` (files out, with prefetch) and
:func:`merge_task_vectors` (a lazy TaskVector out). A method with a linear form for its
config takes :func:`linear_sum`, the one fast path, instead of stacking the K inputs.
"""
from __future__ import annotations

import math
import threading
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, NamedTuple

import torch

from deltakit.io.files import DeltakitFileError

from ._layers import layer_index, lines_factor
from ._registry import MergeContext, MergeMethod
from ._source import TensorSource

__all__ = ["MergeJob", "Loaded", "linear_sum", "linear_coefficients", "work_dtype"]

# a (K, *shape) stack at least this large has its K rows read concurrently
_CONCURRENT_READ_BYTES = 8 << 20


def work_dtype(compute_dtype: torch.dtype) -> torch.dtype:
    """Accumulate in fp32 (or fp64 on request) whatever the storage dtype."""
    return torch.float64 if compute_dtype == torch.float64 else torch.float32


def linear_coefficients(method: MergeMethod, cfg: Any, k: int) -> list[float] | None:
    """``[c_1..c_K]`` when ``method`` with ``cfg`` is ``b + sum_k c_k x_k``, else None (a method
    reading statistics never takes the fast path: its weights depend on the data)."""
    if method.linear_form is None or method.needs_stats or method.uses_stats:
        return None
    return method.linear_form(cfg, k)


def _scratch(local: threading.local, n_el: int, dtype: torch.dtype) -> torch.Tensor:
    """A per-thread buffer reused across tensors (no fresh pages per tensor)."""
    buf = getattr(local, "work", None)
    if buf is None or buf.numel() < n_el or buf.dtype != dtype:
        buf = torch.empty(max(n_el, 1), dtype=dtype)
        local.work = buf
    return buf[:n_el]


def linear_sum(inputs: Sequence[torch.Tensor], coefs: Sequence[float], base: torch.Tensor | None,
               shape: tuple[int, ...], work: torch.dtype, chunk: int,
               scratch: threading.local | None = None) -> torch.Tensor:
    """``b + sum_k c_k x_k`` in ``work`` dtype, chunk by chunk (the linear fast path).

    ``inputs``: K flat tensors (any float dtype; memory maps of the files, read once, never
    copied whole). With ``base`` (flat, ``work`` dtype) the inputs are weights and each term
    is ``c_k (x_k - b)`` computed first, as the method does (no cancellation); without it the
    inputs are taken as they are. Each output chunk stays in cache while the K inputs are
    added into it: one read per input and one write, not K read-modify-write passes over the
    whole output. Per element the operations and their order are those of the whole-tensor
    form (``chunk=0``: one pass over the whole tensor), so the result does not depend on
    ``chunk`` (elements per chunk).
    """
    out = torch.empty(shape, dtype=work)
    flat = out.view(-1)
    step = chunk if chunk > 0 else max(1, flat.numel())
    local = scratch if scratch is not None else threading.local()
    for a in range(0, flat.numel(), step):
        e = min(flat.numel(), a + step)
        o = flat[a:e]
        first = base is None
        if base is not None:
            o.copy_(base[a:e])
        for t, c in zip(inputs, coefs):
            x = t[a:e]
            if base is not None:
                x = torch.sub(x, base[a:e], out=_scratch(local, e - a, work))
            if first:  # first term c * x (== 0 + c * x bit for bit): no zero-filled pass
                # (a bf16 x is widened first: torch would multiply in bf16, then widen)
                if x.dtype == work:
                    torch.mul(x, c, out=o)
                else:
                    o.copy_(x).mul_(c)
                first = False
            else:
                o.add_(x, alpha=c)
    return out


class Loaded(NamedTuple):
    """One parameter read for its merge: ``kind`` "raw" (non-float copies to compare), "merged"
    (the linear sum, already merged) or "float" (``x``: the (K, *shape) stack)."""

    kind: str
    base: torch.Tensor | None
    x: Any
    cfg: Any


@dataclass
class MergeJob:
    """What every per-name job of one merge run shares. ``load`` reads (on a prefetch thread
    if the caller likes), ``finish`` merges; ``__call__`` does both.

    ``base`` None: no base model (task vectors, or weights merged without one); the methods
    then see a stride-0 zero view (nothing allocated; methods never write to base).
    """

    method: MergeMethod
    srcs: Sequence[TensorSource]
    base: TensorSource | None
    config_for: Callable[[str, int | None, int], Any]
    num_layers: int
    chunk: Callable[[], int]  # elements per chunk of the linear sum, read per tensor
    work: torch.dtype = torch.float32
    generator_for: Callable[[str], torch.Generator | None] = lambda name: None
    stats_for: Callable[[str], Mapping[str, torch.Tensor]] | None = None
    lines: tuple[float, float] | None = None
    readers: ThreadPoolExecutor | None = None  # reads the K rows of a large stack concurrently
    scratch: threading.local = field(default_factory=threading.local)

    def __call__(self, name: str, shape: tuple[int, ...], floating: bool = True) -> torch.Tensor:
        return self.finish(name, shape, self.load(name, shape, floating))

    def load(self, name: str, shape: tuple[int, ...], floating: bool = True) -> Loaded:
        """Read one parameter; a non-float one as raw copies, a linear-form one already summed."""
        if not floating:
            base_t = self.base.read(name) if self.base is not None else None
            return Loaded("raw", base_t, [s.read(name) if name in s else base_t for s in self.srcs], None)
        base_t = self.base.read_work(name, self.work, shape) if self.base is not None else None
        cfg = self.config_for(name, layer_index(name), self.num_layers)
        coefs = linear_coefficients(self.method, cfg, len(self.srcs))
        if coefs is not None:
            return Loaded("merged", base_t, self._linear(name, shape, base_t, coefs), cfg)
        return Loaded("float", base_t, self._stack(name, shape, base_t), cfg)

    def _linear(self, name: str, shape, base_t: torch.Tensor | None, coefs: list[float]) -> torch.Tensor:
        deltas = self.method.inputs == "deltas" and base_t is not None
        inputs, used = [], []
        for s, c in zip(self.srcs, coefs):
            if name in s:
                inputs.append(s.flat(name))
            elif deltas:  # missing="base": a zero task vector, skipped
                continue
            else:  # missing="base" on weights: that model contributes the base
                inputs.append(base_t.reshape(-1))
            used.append(c)
        return linear_sum(inputs, used, base_t.reshape(-1) if deltas else None, shape, self.work,
                          self.chunk(), self.scratch)

    def _stack(self, name: str, shape, base_t: torch.Tensor | None) -> torch.Tensor:
        """x (K, *shape) in work dtype; a model without ``name`` contributes the base."""
        x = torch.empty((len(self.srcs), *shape), dtype=self.work)

        def fill(i: int) -> None:
            s = self.srcs[i]
            if name in s:
                s.read_into(name, x[i])
            else:
                x[i].copy_(base_t)

        if self.readers is not None and x.numel() * x.element_size() >= _CONCURRENT_READ_BYTES:
            for fut in [self.readers.submit(fill, i) for i in range(len(self.srcs))]:
                fut.result()
        else:
            for i in range(len(self.srcs)):
                fill(i)
        return x

    def finish(self, name: str, shape: tuple[int, ...], got: Loaded) -> torch.Tensor:
        """Merge what ``load`` read; then LiNeS: ``b + lambda(layer) (merged - b)``."""
        if got.kind == "raw":
            return self._identical(name, got)
        layer = layer_index(name)
        bw = got.base if got.base is not None else torch.zeros((), dtype=self.work).expand(shape)
        out = got.x if got.kind == "merged" else self._merge(name, layer, got.cfg, got.base, bw, got.x)
        if self.lines is None:
            return out
        f = lines_factor(name, layer, self.num_layers, *self.lines)
        return out * f if got.base is None else bw + f * (out - bw)

    def _merge(self, name: str, layer: int | None, cfg: Any, base_t, bw, x: torch.Tensor) -> torch.Tensor:
        ctx = MergeContext(name=name, layer=layer, num_layers=self.num_layers,
                           stats=self.stats_for(name) if self.stats_for else {},
                           generator=self.generator_for(name))
        if self.method.inputs == "deltas" and base_t is not None:
            x.sub_(bw)
        return self.method(x, bw, cfg, ctx)

    def _identical(self, name: str, got: Loaded) -> torch.Tensor:
        """A non-float tensor (ids, masks) is copied; every model must hold the same."""
        first = got.base if got.base is not None else got.x[0]
        for i, t in enumerate(got.x):
            if not torch.equal(t, first):
                raise DeltakitFileError(f"{name}: non-float tensor differs in {self.srcs[i].label}; "
                                        f"expected identical copies")
        return first


def check_finite(name: str, t: torch.Tensor) -> None:
    """One reduction (NaN / inf propagate into the sum); a non-finite merge is an error."""
    if t.is_floating_point() and not math.isfinite(float(t.sum(dtype=torch.float32))):
        raise FloatingPointError(f"{name}: merge produced non-finite values (check weights / densities)")
