"""A size budget: choose codec and setting per tensor to minimise the total error (rate-distortion).

Given a delta (a :class:`~deltakit.taskvec.TaskVector`) and a budget in bytes (``target_bytes``,
or ``ratio``: the dense delta's bytes divided by it), pick for every tensor ``t`` one candidate
setting ``s_t`` (a registered compressor with its knobs, or ``keep``: the entry as it is) to

    minimise  sum_t D_t(s_t)   subject to   sum_t R_t(s_t) <= budget

where ``R_t`` is the exact stored bytes of the encoded parts and ``D_t = |dW_t - decode|_F^2``,
or, with activation statistics, ``sum_j E[x_j^2] |dW_t[:, j] - decode[:, j]|^2`` (the expected
squared change of the layer's output, input feature ``j``; a bias sees a constant input 1).

Two passes, streaming: :func:`measure` computes each tensor's dense delta once, encodes it with
every candidate and keeps only the numbers ``(bytes, error)``; :func:`allocate` then solves the
allocation from the numbers alone; the chosen settings are encoded again when written
(:func:`sources`). The solver is the Lagrangian / convex-hull one (Shoham & Gersho 1988): on
each tensor's lower convex hull of ``(bytes, error)`` points, start every tensor at its
cheapest point and repeatedly take the step with the largest error decrease per byte that
still fits (the hull makes each tensor's slopes decreasing, so the greedy order is the order
of increasing lambda); bytes the hull steps leave over buy the best single change that fits,
off the hull too. Each uniform allocation (one setting for every tensor) that fits is a
candidate too, so the result is never worse than the best single codec+setting at that size.
The allocation is exact at budgets on the hulls' vertices; between them it is a heuristic (an
exact multiple-choice knapsack can do better on small cases, see tests/compress/test_budget.py).

>>> alloc = plan_budget(tv, ratio=16, codecs=["topk"])      # doctest: +SKIP
>>> print(alloc.table())                                     # per tensor: choice, bytes, error
"""
from __future__ import annotations

import dataclasses
import heapq
import itertools
import math
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from functools import cached_property
from typing import Any

import torch
from torch import nn

from .._fmt import table
from ..core.fields import fields_of
from ..taskvec import Delta, TaskVector, as_dense
from ..taskvec._values import encode
from ._registry import CompressConfigError, build_compressor_config, compress_tensor, list_compressors
from .container import Source

__all__ = ["KEEP", "Setting", "Point", "Measured", "Choice", "Allocation", "BudgetError", "default_grid",
           "measure", "hull", "allocate", "plan_budget", "sources", "budget_bytes", "parse_size",
           "weighted_error", "activation_stats"]

KEEP = "keep"
_MAX_GRID = 24          # candidate settings per compressor (a sweep wider than this is thinned)
_LOG_STEPS = 11         # float knobs in (0, 1]: 1, 1/2, ..., 1/1024
_INT_SWEEP = 16         # an int knob with at most this many values is swept whole


class BudgetError(ValueError):
    """The budget cannot be met, or was given wrongly."""


# ----------------------------------------------------------------------------- candidates
@dataclass(frozen=True)
class Setting:
    """One candidate: a registered compressor and its knobs, or :data:`KEEP`."""

    codec: str
    knobs: tuple[tuple[str, Any], ...] = ()

    @property
    def label(self) -> str:
        return self.codec if not self.knobs else f"{self.codec}({', '.join(f'{k}={v}' for k, v in self.knobs)})"

    @cached_property
    def config(self) -> Any:
        return None if self.codec == KEEP else build_compressor_config(self.codec, dict(self.knobs))

    @property
    def recorded_knobs(self) -> dict[str, Any]:
        """Every knob of the config (defaults included), JSON-able: what a file records."""
        if self.config is None:
            return {}
        return {k: list(v) if isinstance(v, tuple) else v for k, v in dataclasses.asdict(self.config).items()}

    def encode(self, value: Delta) -> Delta:
        """The entry under this setting (``keep``: unchanged; the input is never mutated)."""
        if self.codec == KEEP:
            return value
        return compress_tensor(as_dense(value), self.codec, self.config)


def _sweep(spec) -> list[Any] | None:
    """Values a budget sweeps for one knob, or None to keep its default: a log-scale fraction
    with an upper bound by halving from it, a log-scale integer by doubling, a short integer
    range whole. Choices and other types keep their default."""
    t = spec.item_type
    if spec.choices is not None or t not in (int, float):
        return None
    if t is float and spec.log and spec.high is not None:
        vals = [spec.high / 2 ** i for i in range(_LOG_STEPS)]
    elif t is int and spec.log:
        vals = [2 ** i for i in range(11)]
    elif t is int and spec.low is not None and spec.high is not None and spec.high - spec.low < _INT_SWEEP:
        vals = list(range(int(spec.low), int(spec.high) + 1))
    else:
        return None
    return [v for v in vals if spec.contains(v)] or None


def _settings_of(name: str, config: type) -> list[Setting]:
    axes = [(s.name, vals) for s in fields_of(config) if (vals := _sweep(s))]
    while axes and math.prod(len(v) for _, v in axes) > _MAX_GRID:
        i = max(range(len(axes)), key=lambda j: len(axes[j][1]))
        axes[i] = (axes[i][0], axes[i][1][::2])
    out = []
    for combo in itertools.product(*(vals for _, vals in axes)):
        s = Setting(name, tuple(zip((n for n, _ in axes), combo)))
        try:
            s.config  # noqa: B018  (a combination the config refuses is no candidate)
        except CompressConfigError:
            continue
        out.append(s)
    return out or [Setting(name)]


def default_grid(codecs: Iterable[str] | None = None, *, keep: bool = True) -> list[Setting]:
    """Candidate settings read from the registry: every compressor (or those named), its
    size knobs swept as their declarations allow (:func:`_sweep`), the others at their defaults;
    plus :data:`KEEP` (the entry as it is, error 0) unless ``keep=False``."""
    known = {c.name: c for c in list_compressors()}
    names = list(codecs) if codecs is not None else list(known)
    unknown = [n for n in names if n not in known and n != KEEP]
    if unknown:
        raise CompressConfigError(f"expected compressors from ({', '.join(known)}), found {unknown[0]!r}")
    grid = [s for n in names if n != KEEP for s in _settings_of(n, known[n].config)]
    return grid + ([Setting(KEEP)] if keep or KEEP in names else [])


# ----------------------------------------------------------------------------- measuring
def weighted_error(dw: torch.Tensor, approx: torch.Tensor, stats: torch.Tensor | None = None) -> float:
    """``|dW - approx|_F^2``, or with ``stats`` (mean ``x_j^2`` per input feature ``j``, the last
    dimension) ``sum_j stats_j * |dW[..., j] - approx[..., j]|^2``; fp64 accumulation."""
    d2 = (dw.double() - approx.double()).pow(2)
    if stats is None or dw.dim() < 2:
        return float(d2.sum())
    if stats.numel() != dw.shape[-1]:
        raise BudgetError(f"activation statistics: expected {dw.shape[-1]} input features, found {stats.numel()}")
    return float(d2.reshape(-1, dw.shape[-1]).sum(0) @ stats.double().reshape(-1))


def stored_bytes(value: Delta) -> int:
    """Bytes the value's parts take in the file (what :mod:`.container` writes)."""
    return sum(t.nbytes for t in encode(value)[1].values())


@dataclass(frozen=True)
class Point:
    setting: Setting
    bytes: int
    error: float


@dataclass(frozen=True)
class Measured:
    """One tensor's numbers: its dense size, its (weighted) squared norm and every candidate."""

    name: str
    numel: int
    original_bytes: int
    norm2: float
    points: tuple[Point, ...]


def _measure_one(name: str, value: Delta, settings: Sequence[Setting], stats: torch.Tensor | None) -> Measured:
    dw = as_dense(value)
    pts = []
    for s in settings:
        try:
            enc = s.encode(value)
        except (ValueError, TypeError) as e:  # the codec cannot take this tensor (a 1-d bias for SVD...)
            if isinstance(e, CompressConfigError):
                raise
            continue
        pts.append(Point(s, stored_bytes(enc), weighted_error(dw, as_dense(enc, dw.dtype), stats)))
    if not pts:
        raise BudgetError(f"{name}: no candidate setting can encode this tensor {tuple(dw.shape)}; add 'keep'")
    return Measured(name, dw.numel(), dw.numel() * dw.element_size(),
                    weighted_error(dw, torch.zeros_like(dw), stats), tuple(pts))


def measure(tv: TaskVector, settings: Sequence[Setting], *, stats: Mapping[str, torch.Tensor] | None = None,
            progress: bool = False) -> dict[str, Measured]:
    """First pass: per tensor (one dense delta in memory at a time), every candidate's exact
    stored bytes and error. Only these numbers are kept."""
    stats = stats or {}
    names = tv.keys()
    it: Iterable[str] = names
    if progress:
        from tqdm.auto import tqdm
        it = tqdm(names, desc="measuring", unit="tensor")
    return {n: _measure_one(n, tv.get(n), settings, stats.get(n)) for n in it}


# ----------------------------------------------------------------------------- allocating
def hull(points: Iterable[Point]) -> list[Point]:
    """The lower convex hull of ``(bytes, error)``: bytes increasing, error strictly decreasing,
    slopes increasing (each step buys less error per byte than the one before)."""
    frontier: list[Point] = []
    for p in sorted(points, key=lambda p: (p.bytes, p.error, p.setting.label)):
        if not frontier or p.error < frontier[-1].error:
            frontier.append(p)
    out: list[Point] = []
    for p in frontier:
        while len(out) >= 2 and _cross(out[-2], out[-1], p) <= 0:
            out.pop()
        out.append(p)
    return out


def _cross(o: Point, a: Point, b: Point) -> float:
    return (a.bytes - o.bytes) * (b.error - o.error) - (a.error - o.error) * (b.bytes - o.bytes)


@dataclass(frozen=True)
class Choice:
    name: str
    setting: Setting
    bytes: int
    error: float
    numel: int
    original_bytes: int
    norm2: float

    @property
    def rel_error(self) -> float:
        """``error / |dW|^2`` (same weighting): 0 lossless, 1 as bad as dropping the tensor."""
        return self.error / self.norm2 if self.norm2 else 0.0


@dataclass(frozen=True)
class Allocation:
    """The chosen setting per tensor; ``method`` says which candidate allocation won."""

    choices: dict[str, Choice]
    budget: int
    method: str

    @property
    def total_bytes(self) -> int:
        return sum(c.bytes for c in self.choices.values())

    @property
    def total_error(self) -> float:
        return sum(c.error for c in self.choices.values())

    @property
    def original_bytes(self) -> int:
        return sum(c.original_bytes for c in self.choices.values())

    def rows(self) -> list[dict[str, Any]]:
        return [{"tensor": c.name, "choice": c.setting.label, "bytes": c.bytes,
                 "bits/param": f"{8 * c.bytes / max(1, c.numel):.3f}",
                 "ratio": f"{c.original_bytes / c.bytes:.1f}x" if c.bytes else "inf",
                 "error": f"{c.error:.4g}", "rel_error": f"{c.rel_error:.4f}"} for c in self.choices.values()]

    def table(self) -> str:
        """Per-tensor choices, bytes and error, then the totals against the budget."""
        total = {"tensor": "TOTAL", "choice": self.method, "bytes": self.total_bytes,
                 "ratio": f"{self.original_bytes / max(1, self.total_bytes):.1f}x",
                 "error": f"{self.total_error:.4g}",
                 "rel_error": f"{self.total_error / max(1e-300, sum(c.norm2 for c in self.choices.values())):.4f}"}
        cols = ["tensor", "choice", "bytes", "bits/param", "ratio", "error", "rel_error"]
        return table([*self.rows(), total], cols) + f"\nbudget {self.budget:,} bytes, used {self.total_bytes:,}"


def _greedy(hulls: Mapping[str, list[Point]], budget: int) -> dict[str, Point]:
    """Start at every hull's cheapest point; take the best error-per-byte step that fits."""
    at = {n: 0 for n in hulls}
    total = sum(h[0].bytes for h in hulls.values())
    heap: list[tuple[float, str]] = []

    def push(n: str) -> None:
        h, i = hulls[n], at[n]
        if i + 1 < len(h):
            heapq.heappush(heap, ((h[i + 1].error - h[i].error) / (h[i + 1].bytes - h[i].bytes), n))

    for n in hulls:
        push(n)
    while heap:
        _, n = heapq.heappop(heap)
        a, b = hulls[n][at[n]], hulls[n][at[n] + 1]
        if total + b.bytes - a.bytes <= budget:
            total += b.bytes - a.bytes
            at[n] += 1
            push(n)
        # else: this tensor is done (its later hull points cost more still)
    return {n: hulls[n][i] for n, i in at.items()}


def _fill(measured: Mapping[str, Measured], chosen: dict[str, Point], budget: int) -> dict[str, Point]:
    """Spend what the hull steps left over: repeatedly take the single change of one tensor to
    any of its points (on the hull or not) that fits and lowers the error most."""
    chosen = dict(chosen)
    left = budget - sum(p.bytes for p in chosen.values())
    while True:
        best = max(((chosen[n].error - q.error, n, q) for n, m in measured.items() for q in m.points
                    if q.bytes - chosen[n].bytes <= left), key=lambda t: t[0], default=None)
        if best is None or best[0] <= 0:
            return chosen
        _, n, q = best
        left -= q.bytes - chosen[n].bytes
        chosen[n] = q


def _uniform(measured: Mapping[str, Measured], budget: int) -> tuple[Setting, dict[str, Point]] | None:
    """The best single setting every tensor takes, within the budget (None if none fits)."""
    best = None
    per = [{p.setting: p for p in m.points} for m in measured.values()]
    common = set(per[0]).intersection(*per[1:]) if per else set()
    for s in sorted(common, key=lambda s: s.label):
        pts = {n: d[s] for n, d in zip(measured, per)}
        b, e = sum(p.bytes for p in pts.values()), sum(p.error for p in pts.values())
        if b <= budget and (best is None or e < best[0]):
            best = (e, s, pts)
    return None if best is None else (best[1], best[2])


def allocate(measured: Mapping[str, Measured], budget: int) -> Allocation:
    """Second step, numbers only: the convex-hull allocation, or the best uniform setting if
    that has less error at this budget. A budget below the cheapest candidates is an error."""
    hulls = {n: hull(m.points) for n, m in measured.items()}
    floor = sum(h[0].bytes for h in hulls.values())
    if floor > budget:
        raise BudgetError(f"expected a budget of at least {floor:,} bytes (every tensor at its smallest "
                          f"candidate), found {budget:,}; allow smaller settings or a larger budget")
    chosen, method = _fill(measured, _greedy(hulls, budget), budget), "rate-distortion"
    uni = _uniform(measured, budget)
    if uni is not None and sum(p.error for p in uni[1].values()) < sum(p.error for p in chosen.values()):
        chosen, method = uni[1], f"uniform {uni[0].label}"
    choices = {n: Choice(n, p.setting, p.bytes, p.error, measured[n].numel, measured[n].original_bytes,
                         measured[n].norm2)
               for n, p in chosen.items()}
    return Allocation(choices, budget, method)


# ----------------------------------------------------------------------------- budgets
_UNITS = {"": 1, "b": 1, "kb": 10 ** 3, "mb": 10 ** 6, "gb": 10 ** 9, "kib": 2 ** 10, "mib": 2 ** 20,
          "gib": 2 ** 30, "k": 10 ** 3, "m": 10 ** 6, "g": 10 ** 9}


def parse_size(text: str) -> int:
    """``"20MB"`` -> 20_000_000, ``"1.5GiB"``, ``"4096"`` (bytes)."""
    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([a-zA-Z]*)\s*", str(text))
    if not m or m.group(2).lower() not in _UNITS:
        raise BudgetError(f"expected a size such as 20MB, 512KiB or 4096, found {text!r}")
    return int(float(m.group(1)) * _UNITS[m.group(2).lower()])


def budget_bytes(original_bytes: int, target_bytes: int | None = None, ratio: float | None = None) -> int:
    """The budget from exactly one of ``target_bytes`` and ``ratio`` (dense bytes / ratio)."""
    if (target_bytes is None) == (ratio is None):
        raise BudgetError("expected exactly one of a target size and a ratio, found "
                          + ("both" if target_bytes is not None else "neither"))
    if ratio is not None:
        if not ratio > 0:
            raise BudgetError(f"expected a ratio > 0, found {ratio}")
        return int(original_bytes / ratio)
    if target_bytes <= 0:  # type: ignore[operator]
        raise BudgetError(f"expected a target size > 0 bytes, found {target_bytes}")
    return int(target_bytes)  # type: ignore[arg-type]


def plan_budget(tv: TaskVector, *, target_bytes: int | None = None, ratio: float | None = None,
                codecs: Iterable[str] | None = None, settings: Sequence[Setting] | None = None,
                stats: Mapping[str, torch.Tensor] | None = None, progress: bool = False) -> Allocation:
    """Measure every candidate on every tensor of ``tv``, then allocate within the budget.

    ``settings``: the candidates (default :func:`default_grid` of ``codecs``, with ``keep``);
    ``stats``: per weight name, mean ``x^2`` per input feature (:func:`activation_stats`).
    """
    grid = list(settings) if settings is not None else default_grid(codecs)
    measured = measure(tv, grid, stats=stats, progress=progress)
    total = sum(m.original_bytes for m in measured.values())
    return allocate(measured, budget_bytes(total, target_bytes, ratio))


def sources(tv: TaskVector, alloc: Allocation) -> dict[str, Source]:
    """The second pass, lazily: each tensor encoded with its chosen setting when it is written."""
    return {n: Source(lambda n=n, s=c.setting: s.encode(tv.get(n)),
                      None if c.setting.codec == KEEP else c.setting.codec, c.setting.recorded_knobs)
            for n, c in alloc.choices.items()}


# ----------------------------------------------------------------------------- activations
def _plain_linears(model: nn.Module) -> dict[str, nn.Module]:
    """``weight name -> module whose input is that weight's input``: plain ``nn.Linear`` layers,
    and deltakit layers wrapping one (their input is the linear's)."""
    from ..core.layer import DeltaLayer

    wrapped = {f"{n}.base" for n, m in model.named_modules() if isinstance(m, DeltaLayer)}
    out = {}
    for n, m in model.named_modules():
        if isinstance(m, DeltaLayer) and isinstance(m.base, nn.Linear):
            out[f"{n}.weight"] = m
        elif isinstance(m, nn.Linear) and n not in wrapped:
            out[f"{n}.weight"] = m
    return out


def activation_stats(model: nn.Module, batches: Iterable[Any]) -> dict[str, torch.Tensor]:
    """Mean ``x_j^2`` per input feature of every linear layer over ``batches`` (forward hooks),
    keyed by the weight's plain name: the weighting :func:`weighted_error` takes.

    A batch is a mapping (``model(**batch)``) or a tensor (``model(batch)``); every row of every
    position counts once. (Conv1D-style transposed weights are not covered.)
    """
    sums: dict[str, torch.Tensor] = {}
    counts: dict[str, int] = {}

    def hook(name: str):
        def fn(_m, args, _out):
            x = args[0].detach().reshape(-1, args[0].shape[-1]).double()
            sums[name] = sums.get(name, 0) + x.pow(2).sum(0)
            counts[name] = counts.get(name, 0) + x.shape[0]
        return fn

    handles = [m.register_forward_hook(hook(n)) for n, m in _plain_linears(model).items()]
    try:
        with torch.no_grad():
            for b in batches:
                model(**b) if isinstance(b, Mapping) else model(b)
    finally:
        for h in handles:
            h.remove()
    return {n: (sums[n] / counts[n]).float() for n in sums}
