"""Multi-fidelity: non-dominated sorting by hand, and toys with a known optimum where pruning
at low fidelity finds what the full search finds, for a fraction of the training steps."""
from __future__ import annotations

import math
import random

import numpy as np
import optuna
import pytest

from deltakit.search.fidelity import (MoSuccessiveHalving, SingleObjectiveFidelity, crowding_distance,
                                      make_pruner, nondominated_rank, order_by_front, promotable, rungs)

optuna.logging.set_verbosity(optuna.logging.WARNING)
MAX = 81


def test_rungs_are_geometric_below_the_total():
    assert rungs(81, 1, 3) == [1, 3, 9, 27]
    assert rungs(200, 25, 2) == [25, 50, 100]
    assert rungs(10, 10, 3) == []


def test_nondominated_rank_by_hand():
    # (metric up, params down): a=(0.9, 100) b=(0.8, 10) c=(0.7, 50) d=(0.9, 200) e=(0.6, 5)
    v = np.array([[0.9, 100], [0.8, 10], [0.7, 50], [0.9, 200], [0.6, 5]])
    # c is dominated by b; d by a; once a, b, e go, c and d are both non-dominated
    assert nondominated_rank(v, ["maximize", "minimize"]).tolist() == [0, 0, 1, 1, 0]


def test_crowding_distance_by_hand():
    # one front, sorted by x: (0,4) (1,3) (3,1) (4,0); spans 4 and 4
    v = np.array([[0, 4], [1, 3], [3, 1], [4, 0]], dtype=float)
    d = crowding_distance(v)
    # (1,3): x neighbours 0 and 3 -> 3/4; y neighbours 4 and 1 -> 3/4: 1.5; (3,1) likewise
    assert d[0] == math.inf and d[3] == math.inf and d[1] == pytest.approx(1.5) and d[2] == pytest.approx(1.5)


def test_order_by_front_ranks_then_crowding():
    v = np.array([[0.0, 4.0], [1.0, 3.0], [2.0, 2.9], [4.0, 0.0], [1.0, 4.0]])  # minimise both
    # rank 0: rows 0, 1, 2, 3 (row 4 is dominated by row 1). Within rank 0 the extremes 0 and 3 come
    # first (infinite distance, then by index), then row 2 (crowding (4-1)/4 + (3-0)/4 = 1.5) before
    # row 1 ((2-0)/4 + (4-2.9)/4 = 0.775)
    assert order_by_front(v, ["minimize", "minimize"]) == [0, 3, 2, 1, 4]
    # top max(1, n // eta): with 5 trials and eta 3 only the first continues
    assert promotable(v.tolist(), 0, 3, ["minimize"] * 2) and not promotable(v.tolist(), 2, 3, ["minimize"] * 2)
    assert promotable([[1.0, 1.0]], 0, 3, ["minimize"] * 2)  # alone at a rung: continues


def test_a_toy_study_front_is_exactly_the_non_dominated_set():
    study = optuna.create_study(directions=["maximize", "minimize"], sampler=optuna.samplers.RandomSampler(seed=3))
    study.optimize(lambda t: (math.sin(3 * (x := t.suggest_float("x", 0, 2))) + x, round(10 * x) + t.number % 3),
                   n_trials=60)
    vals = [t.values for t in study.trials]
    brute = {i for i, a in enumerate(vals)
             if not any(b[0] >= a[0] and b[1] <= a[1] and (b[0] > a[0] or b[1] < a[1]) for b in vals)}
    rank = nondominated_rank(np.array(vals), ["maximize", "minimize"])
    assert {i for i, r in enumerate(rank) if r == 0} == brute
    assert {t.number for t in study.best_trials} == brute  # Optuna agrees
    from deltakit.search.report import pareto_front
    assert {t.number for t in pareto_front(study.trials, ["metric", "params"])} == brute


# ----------------------------------------------------------------------------- toys
def _curve(q: float, step: int) -> float:
    """A learning curve: the configuration's quality q, reached as steps grow."""
    return q * (1 - math.exp(-step / 20))


def _run(order, judge, values_at, directions):
    """Every configuration of ``order`` once (enqueued), pruned by ``judge`` (None: full runs);
    returns (study, training steps spent)."""
    study = optuna.create_study(directions=directions,
                                pruner=make_pruner("halving", 3, 3, MAX, len(directions)) if judge else None)
    for cfg in order:
        study.enqueue_trial(dict(zip(("a", "b"), cfg)))
    spent = 0

    def objective(t):
        nonlocal spent
        cfg = (t.suggest_int("a", 0, 100), t.suggest_int("b", 0, 100))
        done = 0
        for step in judge.rungs(MAX) if judge else []:
            spent, done = spent + step - done, step
            if not judge.keep(t, step, values_at(cfg, step)):
                raise optuna.TrialPruned()
        spent += MAX - done
        v = values_at(cfg, MAX)
        return v[0] if len(directions) == 1 else tuple(v)

    study.optimize(objective, n_trials=len(order))
    return study, spent


def test_single_objective_halving_finds_the_full_search_best_for_a_fraction_of_the_steps():
    grid = [(a, b) for a in range(9) for b in range(3)]           # 27 configurations, optimum (5, 1)

    def values_at(cfg, step):  # early steps mislead a little (the noise fades), the optimum is known
        a, b = cfg
        q = 1 - 0.02 * (a - 5) ** 2 - 0.1 * (b != 1)
        return [_curve(q, step) + 0.03 * math.sin(7 * a + 3 * b) * math.exp(-step / 10)]

    full, full_cost = _run(grid, None, values_at, ["maximize"])
    assert (full.best_params["a"], full.best_params["b"]) == (5, 1)
    for seed in range(3):
        order = random.Random(seed).sample(grid, len(grid))
        pruned, cost = _run(order, SingleObjectiveFidelity(3, 3), values_at, ["maximize"])
        assert pruned.best_params == full.best_params
        assert cost < 0.35 * full_cost, (cost, full_cost)  # 27 x 81 = 2187 steps for the full search


def test_multi_objective_halving_finds_the_known_optimum_for_a_fraction_of_the_steps():
    """(metric up, params down): configuration (3, 1) has the best metric and the fewest
    parameters of its rivals, so the full search's front is {(3, 1)}: MO successive halving must
    complete it in any order of arrival (it is rank 0 alone at every rung)."""
    grid = [(a, b) for a in range(9) for b in range(3)]

    def values_at(cfg, step):
        a, b = cfg
        q = 1 - 0.03 * (a - 3) ** 2 - 0.1 * (b != 1)
        return [_curve(q, step), 1000 + 100 * abs(a - 3) + 10 * b * (b != 1)]

    dirs = ["maximize", "minimize"]
    full, full_cost = _run(grid, None, values_at, dirs)
    assert [(t.params["a"], t.params["b"]) for t in full.best_trials] == [(3, 1)]
    for seed in range(5):
        order = random.Random(seed).sample(grid, len(grid))
        pruned, cost = _run(order, MoSuccessiveHalving(3, 3, dirs), values_at, dirs)
        assert [(t.params["a"], t.params["b"]) for t in pruned.best_trials] == [(3, 1)]
        assert cost < 0.35 * full_cost, (cost, full_cost)
        at_first_rung = [t for t in pruned.trials if "rung:3" in t.user_attrs]
        assert len(at_first_rung) == 27  # every configuration was seen at the cheapest fidelity


def test_a_failed_trials_rungs_do_not_count():
    """A worker died after rung 3 of trial 0; its retry (trial 1, the same point) reaches rung 3
    with the same values and must not lose to the dead copy of itself."""
    dirs = ["maximize", "minimize"]
    study = optuna.create_study(directions=dirs)
    judge = MoSuccessiveHalving(3, 3, dirs)
    dead = study.ask()
    assert judge.keep(dead, 3, [0.5, 100.0])
    study.tell(dead, state=optuna.trial.TrialState.FAIL)
    retry = study.ask()
    assert judge.keep(retry, 3, [0.5, 100.0])  # alone among live trials: continues
    other = study.ask()
    assert not judge.keep(other, 3, [0.4, 100.0])  # dominated by the retry: pruned (n = 2, top 1)
