"""Multi-fidelity on training steps: successive halving / Hyperband.

A trial trains for ``steps``; at each **rung** (``min_steps * eta**k`` steps, below the trial's
total) it is scored on the held-out split and either continues or is pruned.

* **One objective**: Optuna's own pruners (``SuccessiveHalvingPruner`` = asynchronous
  successive halving, Li et al. 2020, https://arxiv.org/abs/1810.05934; ``HyperbandPruner``,
  Li et al. 2018, https://arxiv.org/abs/1603.06560), through ``trial.report`` /
  ``trial.should_prune``.
* **Several objectives**: Optuna's pruners do not take vectors (``trial.report`` raises in a
  multi-objective study; optuna#3450), so :class:`MoSuccessiveHalving` is the
  non-domination-based asynchronous successive halving of Schmucker et al. 2021,
  "Multi-objective multi-fidelity hyperparameter optimization with application to fairness"
  (MO-ASHA; Salinas et al., Syne Tune): at a rung, the trials that reached it are ordered by
  non-dominated sorting rank, ties broken by crowding distance (larger first), as NSGA-II
  does (Deb et al. 2002, https://doi.org/10.1109/4235.996017); a trial continues if it is in
  the top ``max(1, n // eta)`` of the ``n`` trials at that rung so far (Optuna's rule for
  one objective, so one trial alone continues). Each rung's vector is stored on the trial
  (user attribute ``rung:<steps>``), so workers on other machines compare through the storage.

What it guarantees, and what not: a configuration non-dominated at every fidelity and alone on
its rank (a known optimum) is never pruned, in any order of arrival (tests/search). A front
wider than the ``1 / eta`` of a rung's arrivals that continue is only partly kept, and which
part depends on the order of arrival (asynchronous halving decides without waiting); a
dominated configuration can then complete in place of a pruned front point. Fewer rungs
(larger ``min_steps``) or a smaller ``eta`` keep more of a wide front.
"""
from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

__all__ = ["rungs", "nondominated_rank", "crowding_distance", "order_by_front", "MoSuccessiveHalving",
           "SingleObjectiveFidelity", "make_fidelity"]

_RUNG = "rung:"


def rungs(total_steps: int, min_steps: int, eta: int) -> list[int]:
    """The steps at which a trial of ``total_steps`` is judged: ``min_steps * eta**k`` < total."""
    out, s = [], min_steps
    while s < total_steps:
        out.append(s)
        s *= eta
    return out


def _as_min(values: np.ndarray, directions: Sequence[str]) -> np.ndarray:
    """Every column as "smaller is better"."""
    sign = np.array([1.0 if d == "minimize" else -1.0 for d in directions])
    return values * sign


def nondominated_rank(values: np.ndarray, directions: Sequence[str]) -> np.ndarray:
    """(n,) rank of each row: 0 = non-dominated, 1 = non-dominated once rank 0 is removed, ...

    values: (n, m). Row a dominates b when it is no worse in every column and better in one."""
    v = _as_min(np.asarray(values, dtype=float), directions)
    n = len(v)
    rank = np.full(n, -1)
    left = np.arange(n)
    r = 0
    while len(left):
        sub = v[left]
        dominated = np.array([np.any(np.all(sub <= s, axis=1) & np.any(sub < s, axis=1)) for s in sub])
        rank[left[~dominated]] = r
        left = left[dominated]
        r += 1
    return rank


def crowding_distance(values: np.ndarray) -> np.ndarray:
    """(n,) NSGA-II crowding distance of rows of one front: the sum over objectives of the
    normalised gap between each point's neighbours; the extremes get infinity."""
    v = np.asarray(values, dtype=float)
    n, m = v.shape
    d = np.zeros(n)
    if n <= 2:
        return np.full(n, np.inf)
    for j in range(m):
        order = np.argsort(v[:, j], kind="stable")
        span = v[order[-1], j] - v[order[0], j]
        d[order[0]] = d[order[-1]] = np.inf
        if span > 0:
            d[order[1:-1]] += (v[order[2:], j] - v[order[:-2], j]) / span
    return d


def order_by_front(values: np.ndarray, directions: Sequence[str]) -> list[int]:
    """Row indices best first: by non-dominated rank, then by crowding distance within a rank
    (larger first), then by index (earlier first: deterministic)."""
    v = np.asarray(values, dtype=float)
    rank = nondominated_rank(v, directions)
    crowd = np.zeros(len(v))
    for r in set(rank.tolist()):
        idx = np.flatnonzero(rank == r)
        crowd[idx] = crowding_distance(v[idx])
    return sorted(range(len(v)), key=lambda i: (rank[i], -crowd[i], i))


class MoSuccessiveHalving:
    """Asynchronous non-domination-based successive halving (MO-ASHA, see the module doc)."""

    def __init__(self, min_steps: int, eta: int, directions: Sequence[str]):
        self.min_steps, self.eta, self.directions = min_steps, eta, list(directions)

    def rungs(self, total_steps: int) -> list[int]:
        return rungs(total_steps, self.min_steps, self.eta)

    def keep(self, trial: Any, step: int, values: Sequence[float]) -> bool:
        """Record ``values`` for rung ``step`` on ``trial``; whether it continues."""
        from optuna.trial import TrialState

        trial.set_user_attr(f"{_RUNG}{step}", [float(x) for x in values])
        # a FAILED trial's rungs do not count: its retry is the same point and would lose to it
        others = [t.user_attrs[f"{_RUNG}{step}"] for t in trial.study.get_trials(deepcopy=False)
                  if t.number != trial.number and t.state != TrialState.FAIL and f"{_RUNG}{step}" in t.user_attrs]
        return promotable([*others, list(values)], len(others), self.eta, self.directions)


def promotable(at_rung: Sequence[Sequence[float]], me: int, eta: int, directions: Sequence[str]) -> bool:
    """Whether row ``me`` of the values recorded at one rung is in the top ``max(1, n // eta)``."""
    order = order_by_front(np.asarray(at_rung, dtype=float), directions)
    return order.index(me) < max(1, len(at_rung) // eta)


class SingleObjectiveFidelity:
    """Rungs for Optuna's own pruners: report the one value, ask ``should_prune``."""

    def __init__(self, min_steps: int, eta: int):
        self.min_steps, self.eta = min_steps, eta

    def rungs(self, total_steps: int) -> list[int]:
        return rungs(total_steps, self.min_steps, self.eta)

    def keep(self, trial: Any, step: int, values: Sequence[float]) -> bool:
        trial.report(float(values[0]), step)
        return not trial.should_prune()


def make_fidelity(min_steps: int, eta: int, directions: Sequence[str]):
    """The rung judge for a study with ``directions``."""
    if len(directions) == 1:
        return SingleObjectiveFidelity(min_steps, eta)
    return MoSuccessiveHalving(min_steps, eta, directions)


def make_pruner(kind: str, min_steps: int, eta: int, max_steps: int, n_objectives: int):
    """Optuna's pruner for a single-objective study (None for several objectives: the rung
    decision is :class:`MoSuccessiveHalving`'s, and Optuna's would never be asked)."""
    import optuna

    if n_objectives > 1:
        return optuna.pruners.NopPruner()
    if kind == "hyperband":
        return optuna.pruners.HyperbandPruner(min_resource=min_steps, max_resource=max_steps, reduction_factor=eta)
    return optuna.pruners.SuccessiveHalvingPruner(min_resource=min_steps, reduction_factor=eta)
