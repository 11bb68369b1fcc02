"""Orthogonal parts of the task-arithmetic family: sparsify x rescale x consensus x combine.

Task arithmetic, TIES, DARE, DARE-TIES, DAREx-q, Model Breadcrumbs and DELLA are
presets of these axes (see :class:`GTAConfig` and the files in ``methods/``).
Each axis is a table of small functions; a preset picks one entry per axis.

Generalised task arithmetic on one parameter, with x_k = theta_k - theta_0 (K, *shape):
``theta = theta_0 + lam * sum_k m_k * w_k * S(x_k) / D``, where S sparsifies (and
rescales) each task vector, m_k is the sign-consensus mask and D is 1, sum_k w_k, or
the disjoint count sum_k w_k m_k (``normalize``).
"""
from __future__ import annotations

import functools
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Literal

import torch

from ..core.fields import Checked, ConfigError, knob
from ._registry import MergeConfigError, MergeContext

__all__ = ["GTAConfig", "gta_merge", "gta_linear_form", "SPARSIFY", "RESCALE", "CONSENSUS", "per_model"]


# --- sparsify: (x (n,) flat, density, gen, gamma, epsilon) -> keep mask (n,) bool ---

def _keep_all(x: torch.Tensor, density: float, gen, gamma: float, epsilon: float) -> torch.Tensor:
    return torch.ones_like(x, dtype=torch.bool)


def _above_kth(mag: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(k-th largest value, mask of the entries strictly above it), O(n)."""
    thr = mag.kthvalue(mag.numel() - k + 1).values
    return thr, mag > thr


def _magnitude(x: torch.Tensor, density: float, gen, gamma: float, epsilon: float) -> torch.Tensor:
    """TIES "trim": keep the k = max(1, floor(density * n)) largest |x| (https://arxiv.org/abs/2306.01708)."""
    k = max(1, int(density * x.numel()))
    # O(n) selection instead of a full sort: the k-th largest magnitude is the threshold;
    # entries tied at the threshold are taken lowest index first so exactly k survive.
    mag = x.abs()
    thr, mask = _above_kth(mag, k)
    need = k - int(mask.sum())
    if need > 0:
        mask[torch.nonzero(mag == thr).squeeze(1)[:need]] = True
    return mask


def _magnitude_sort(x: torch.Tensor, density: float, gen, gamma: float, epsilon: float) -> torch.Tensor:
    """Same kept magnitudes as ``magnitude``, but entries tied at the threshold are chosen the way
    a full ``torch.argsort(descending=True)`` orders them - mergekit's choice, bit for bit. That
    order is implementation-defined for large tensors, so only an ambiguous tie pays for the
    O(n log n) sort: when every entry at the threshold is kept (the usual case for fp32 data),
    the O(n) selection already gives the same set."""
    n = x.numel()
    k = max(1, int(density * n))
    if k >= n:
        return torch.ones_like(x, dtype=torch.bool)
    mag = x.abs().float()
    thr, mask = _above_kth(mag, k)
    at = mag == thr
    if int(mask.sum()) + int(at.sum()) == k:  # no choice among tied entries
        return mask.logical_or_(at)
    mask = torch.zeros_like(x, dtype=torch.bool)
    mask[torch.argsort(mag, descending=True)[:k]] = True
    return mask


def _random(x: torch.Tensor, density: float, gen, gamma: float, epsilon: float) -> torch.Tensor:
    """DARE drop: keep each entry independently with probability density (https://arxiv.org/abs/2311.03099)."""
    return torch.rand(x.shape, generator=gen, dtype=torch.float32) < density


def _breadcrumbs(x: torch.Tensor, density: float, gen, gamma: float, epsilon: float) -> torch.Tensor:
    """Model Breadcrumbs: drop the top gamma*n outliers and the smallest, keeping floor(density*n)
    (https://arxiv.org/abs/2312.06795)."""
    n = x.numel()
    keep, top = int(density * n), int(gamma * n)
    bottom = max(0, n - keep - top)  # shrink outlier removal when density needs it
    mask = torch.zeros_like(x, dtype=torch.bool)
    mask[torch.sort(x.abs()).indices[bottom:bottom + keep]] = True
    return mask


def _della(x: torch.Tensor, density: float, gen, gamma: float, epsilon: float) -> torch.Tensor:
    """DELLA MagPrune: keep prob rises linearly with magnitude rank in [density-eps, density+eps]
    (https://arxiv.org/abs/2406.11617)."""
    eps = epsilon
    if not (0 < density - eps and density + eps < 1):
        raise MergeConfigError(f"epsilon: expected density +/- epsilon inside (0, 1), found "
                               f"density={density}, epsilon={eps}")
    rows = x.reshape(1, -1) if x.dim() < 2 else x
    ranks = torch.argsort(torch.argsort(rows.abs(), dim=-1), dim=-1).to(torch.float32)
    span = (rows.shape[-1] - 1) or 1
    p = (density - eps) + ranks / span * 2 * eps
    return (torch.rand(p.shape, generator=gen) < p).reshape(x.shape)


SPARSIFY: dict[str, Callable[..., torch.Tensor]] = {
    "none": _keep_all, "magnitude": _magnitude, "magnitude_sort": _magnitude_sort, "random": _random,
    "breadcrumbs": _breadcrumbs, "della": _della,
}


# --- rescale: (x, masked, density, q) -> rescaled masked -----------------------------

def _norm_match(ord_fn: Callable[[torch.Tensor], torch.Tensor]):
    def f(x: torch.Tensor, masked: torch.Tensor, density: float, q: float | None) -> torch.Tensor:
        before, after = ord_fn(x), ord_fn(masked)
        if before < 1e-7 or after < 1e-7:
            return masked
        return masked * (before / after)
    return f


RESCALE: dict[str, Callable[..., torch.Tensor]] = {
    "none": lambda x, m, d, q: m,
    "inverse": lambda x, m, d, q: m / d if d > 0 else m,         # DARE: 1 / (1 - p)
    "q": lambda x, m, d, q: m / q,                      # DAREx-q: 1 / q
    "l1": _norm_match(lambda t: t.abs().sum()),                      # mergekit's "rescale"
    "l2": _norm_match(lambda t: torch.linalg.vector_norm(t)),
    "linf": _norm_match(lambda t: t.abs().max() if t.numel() else t.new_zeros(())),
}


# --- consensus: (weighted x (K, n)) -> mask (K, n) ------------------------------------

def _no_consensus(x: torch.Tensor) -> torch.Tensor | None:
    return None


def _elect_sum(x: torch.Tensor) -> torch.Tensor:
    """TIES elect: sign of the summed mass per entry; keep entries that agree (0 never agrees)."""
    majority = torch.where(x.sum(0) >= 0, 1.0, -1.0).to(x.dtype)
    return x.sign() == majority


def _elect_count(x: torch.Tensor) -> torch.Tensor:
    majority = torch.where(x.sign().sum(0) >= 0, 1.0, -1.0).to(x.dtype)
    return x.sign() == majority


CONSENSUS: dict[str, Callable[[torch.Tensor], torch.Tensor | None]] = {
    "none": _no_consensus, "sum": _elect_sum, "count": _elect_count,
}


@dataclass(frozen=True)
class GTAConfig(Checked):
    """Generalised task arithmetic (one field per axis; presets change the defaults)."""

    weights: tuple[float, ...] | None = knob(None, per_model=True, doc="per-model weight w_k (default 1 each)")
    density: float | tuple[float, ...] = knob(
        1.0, ge=0, le=1, per_model=True, doc="fraction of entries kept, one value or one per model")
    sparsify: Literal["none", "magnitude", "magnitude_sort", "random", "breadcrumbs", "della"] = knob(
        "none", doc="how entries are dropped (a key of SPARSIFY)")
    rescale: Literal["none", "inverse", "q", "l1", "l2", "linf"] = knob(
        "none", doc="how the kept entries are rescaled (a key of RESCALE)")
    consensus: Literal["none", "sum", "count"] = knob(
        "none", doc="sign election (a key of CONSENSUS): by summed mass (TIES) or by count")
    normalize: bool = knob(False, doc="divide by the sum of the (agreeing) weights")
    lam: float = knob(1.0, doc="final scale lambda on the merged task vector")
    gamma: float | tuple[float, ...] = knob(
        0.01, ge=0, le=1, per_model=True, doc="breadcrumbs: fraction of largest-magnitude outliers dropped")
    epsilon: float | tuple[float, ...] = knob(
        0.15, ge=0, per_model=True, doc="DELLA: spread of the keep probabilities around the density")
    q: float | tuple[float, ...] | None = knob(
        None, gt=0, per_model=True, doc="DAREx-q: kept entries are rescaled by 1/q (rescale='q')")
    seed: int | None = knob(None, doc="seed of the random drops, mixed with each tensor's name")

    def validate(self) -> None:
        qs = self.q if isinstance(self.q, tuple) else (self.q,)
        if self.rescale == "q" and any(q is None for q in qs):
            raise ConfigError(f"{type(self).__name__}.q: expected a positive number when rescale='q', "
                              f"found {self.q}")


def per_model(value: float | tuple[float, ...] | None, k: int, default: float, field: str) -> list[float]:
    """Broadcast a scalar / per-model tuple to K floats; a wrong length is a one-line error."""
    if value is None:
        return [default] * k
    if isinstance(value, (int, float)):
        return [float(value)] * k
    if len(value) != k:
        raise MergeConfigError(f"{field}: expected {k} values (one per model), found {len(value)}")
    return [float(v) for v in value]


_DETERMINISTIC = ("magnitude", "magnitude_sort", "breadcrumbs")


@functools.cache
def _row_pool() -> ThreadPoolExecutor:
    """A process-wide pool for per-row work (created on first use, sized to torch's threads)."""
    return ThreadPoolExecutor(max_workers=max(2, torch.get_num_threads()), thread_name_prefix="deltakit-rows")


def gta_linear_form(cfg: GTAConfig, k: int) -> list[float] | None:
    """c_k with gta_merge == base + sum_k c_k x_k, when nothing is sparsified or elected."""
    densities = per_model(cfg.density, k, 1.0, "density")
    if cfg.consensus != "none" or (cfg.sparsify != "none" and any(d < 1.0 for d in densities)):
        return None
    w = per_model(cfg.weights, k, 1.0, "weights")
    total = sum(w)
    d = (1.0 if abs(total) < 1e-8 else total) if cfg.normalize else 1.0
    return [cfg.lam * wk / d for wk in w]


def gta_merge(x: torch.Tensor, base: torch.Tensor, cfg: GTAConfig, ctx: MergeContext) -> torch.Tensor:
    """Shapes: x (K, *shape) task vectors, base (*shape) -> (*shape). Inputs are not modified."""
    k = x.shape[0]
    weights = per_model(cfg.weights, k, 1.0, "weights")
    densities = per_model(cfg.density, k, 1.0, "density")
    gammas = per_model(cfg.gamma, k, 0.01, "gamma")
    epsilons = per_model(cfg.epsilon, k, 0.15, "epsilon")
    qs = per_model(cfg.q, k, 1.0, "q")
    sparsify, rescale = SPARSIFY[cfg.sparsify], RESCALE[cfg.rescale]
    gen = ctx.generator
    flat = x.reshape(k, -1)
    stacked = torch.empty_like(flat)  # (K, n): weighted, sparsified task vectors (our own buffer)

    def one(i: int) -> None:
        row, d = flat[i], densities[i]
        if cfg.sparsify != "none" and d < 1.0:
            if d <= 0.0 or row.numel() == 0:
                stacked[i].zero_()
                return
            torch.mul(row, sparsify(row, d, gen, gammas[i], epsilons[i]), out=stacked[i])
            stacked[i].copy_(rescale(row, stacked[i], d, qs[i]))
        else:
            stacked[i].copy_(row)
        stacked[i].mul_(weights[i])

    # the selections (kthvalue, argsort) are single-threaded in torch: large rows of a
    # deterministic sparsifier run on a thread each (a random one keeps its draw order)
    if cfg.sparsify in _DETERMINISTIC and k > 1 and flat.shape[1] >= (1 << 20) and torch.get_num_threads() > 1:
        list(_row_pool().map(one, range(k)))
    else:
        for i in range(k):
            one(i)
    w = torch.tensor(weights, dtype=x.dtype)  # (K,)
    mask = CONSENSUS[cfg.consensus](stacked)
    if mask is not None:
        merged = stacked.mul_(mask).sum(0)
        divisor = w @ mask.to(x.dtype)  # (n,): sum of agreeing weights
        divisor[divisor == 0] = 1
    else:
        merged = stacked.sum(0)
        total = float(w.sum())
        divisor = torch.tensor(1.0 if abs(total) < 1e-8 else total, dtype=x.dtype)
    if cfg.normalize:
        merged = merged / divisor
    if cfg.lam != 1.0:
        merged = merged * cfg.lam
    return base + merged.reshape(base.shape)
