"""`deltakit bench search`: it loads through the CLI, counts compute as steps x batch over trials,
and judges the ~0.1% / ~1% targets on hand-worked numbers (the real run trains MiniLM for hours;
see bench/results/search.md)."""
from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import pytest

from deltakit.cli import main

BENCH = Path(__file__).resolve().parents[2] / "bench"


def test_bench_search_loads_through_the_cli(capsys):
    with pytest.raises(SystemExit) as e:
        main(["bench", "search", "--help"])
    out = capsys.readouterr().out
    assert e.value.code == 0 and all(f in out for f in ("--tasks", "--budget-scale", "--out"))


def test_compute_is_steps_times_batch_over_complete_and_pruned_trials(monkeypatch):
    """39 default runs x 200 steps x 16 = 124,800 examples; at scale 0.5, 62,400. A complete trial
    of 200 steps, one pruned at 22 and one refused (0 steps) cost (200 + 22) x 16 = 3,552; a
    failed trial counts nothing (its retry redoes the steps)."""
    import optuna

    monkeypatch.syspath_prepend(str(BENCH))
    from search.config import BenchConfig, budget_examples
    from search.study import spent_examples

    assert budget_examples(BenchConfig(), 200, 39) == 124_800
    assert budget_examples(BenchConfig(budget_scale=0.5), 200, 39) == 62_400
    study = optuna.create_study(directions=["maximize", "minimize"])
    for state, steps in (("COMPLETE", 200), ("PRUNED", 22), ("PRUNED", 0), ("FAIL", 150)):
        t = study.ask()
        t.set_user_attr("result", {"steps_trained": steps})
        study.tell(t, [0.5, 10.0] if state == "COMPLETE" else None, state=getattr(optuna.trial.TrialState, state))
    got = spent_examples(study, 16)
    assert got["examples"] == 3_552 and (got["COMPLETE"], got["PRUNED"], got["FAIL"]) == (1, 2, 1)


def _run(method, trainable, metric, **kw):
    return {"method": method, "trainable": trainable, "metric": metric, "lr": 1e-3, "settings": {}, **kw}


def test_targets_compare_the_best_default_and_front_point_under_each_cap(monkeypatch):
    """base 1,000,000: ~0.1% caps at 1.5 x 1,000 = 1,500 params, ~1% at 15,000.
    0.1%: defaults under 1,500 are a (0.70) and b (0.74; c at 2,000 is over) -> b; the front's
    best under it is #3 (0.755): +1.5 points, met. 1%: the best default is c (0.80), the best
    front point #7 (0.805): +0.5, not met. Full fine-tuning (0.90) is never "a default"."""
    monkeypatch.syspath_prepend(str(BENCH))
    from search.report import targets

    rec = {"base_params": 1_000_000,
           "defaults": [_run("a", 500, 0.70), _run("b", 1_400, 0.74), _run("c", 2_000, 0.80),
                        _run("full_ft", 1_000_000, 0.90), _run("d", 900, float("nan"))],
           "front": [_run("lora", 1_200, 0.755, trial=3), _run("lora", 12_000, 0.805, trial=7),
                     _run("ia3", 400, 0.60, trial=1)]}
    got = targets(rec, (0.001, 0.01), 1.5)
    assert [(t["cap_params"], t["best_default"]["method"], t["best_front"]["trial"], t["diff_points"], t["met"])
            for t in got] == [(1_500, "b", 3, 1.5, True), (15_000, "c", 7, 0.5, False)]


def test_pick_front_keeps_the_best_under_each_budget_and_spreads_the_rest(monkeypatch):
    """Eight front points (params 10..10^8, metric rising); k = 3 spread picks indices 0, 4, 7
    (round(i * 7 / 2)); the best under 1.5 x 0.1% of 10^6 (1,500 params) is params 1,000."""
    monkeypatch.syspath_prepend(str(BENCH))
    from search.report import pick_front

    front = [SimpleNamespace(number=i, values=(0.5 + 0.01 * i, 10.0 ** (i + 1))) for i in range(8)]
    got = pick_front(front, 1_000_000, 3, (0.001,), 1.5)
    assert [t.number for t in got] == [0, 2, 4, 7]


def test_rungs_sit_at_a_ninth_and_a_third_of_the_steps(monkeypatch):
    """200 steps, eta 3: first rung ceil(200 / 9) = 23, then 69; 207 is past the end (floor
    division gave 22, 66 and 198: a last judgement after 99% of the trial's steps)."""
    monkeypatch.syspath_prepend(str(BENCH))
    from deltakit.search.fidelity import rungs
    from search.config import _first_rung

    assert rungs(200, _first_rung(200, 3), 3) == [23, 69]
    assert rungs(300, _first_rung(300, 3), 3) == [34, 102]
