"""The demo's search step on a tiny BERT: trials really ran, and the printed table is the study's
Pareto front (every printed row non-dominated, every non-dominated trial printed, its
parameter count the one attaching its configuration gives)."""
import copy

import optuna

from deltakit.demo_search import SearchDemoConfig, run_search_demo


def _dominates(a, b) -> bool:
    """(metric up, params down): a is no worse in both and better in one."""
    return a[0] >= b[0] and a[1] <= b[1] and (a[0] > b[0] or a[1] < b[1])


def _printed_rows(out: str) -> list[list[str]]:
    lines = out.split("Pareto front")[1].splitlines()
    head = next(i for i, line in enumerate(lines) if line.startswith("trial"))
    assert lines[head].split(" | ")[:4] == ["trial", "method", "metric", "params"] or \
        [c.strip() for c in lines[head].split("|")][:4] == ["trial", "method", "metric", "params"]
    return [[c.strip() for c in line.split("|")] for line in lines[head + 2:] if line.strip()]


def test_demo_search_prints_the_real_front(tiny_model_dir, tmp_path, capsys):
    cfg = SearchDemoConfig(model=str(tiny_model_dir), out=str(tmp_path), n_train=64, steps=6, min_steps=2,
                           max_length=16, batch_size=8, trials=5)
    res = run_search_demo(cfg)
    out = capsys.readouterr().out
    study = optuna.load_study(study_name="demo-search", storage=f"sqlite:///{res['storage']}")
    states = [t.state.name for t in study.trials]
    assert len(states) == 5 and set(states) <= {"COMPLETE", "PRUNED"} and "COMPLETE" in states
    done = {t.number: t for t in study.trials if t.state.name == "COMPLETE"}
    # a complete trial trained all its steps; its metric is an accuracy of 16 held-out rows
    for t in done.values():
        assert t.user_attrs["result"]["steps_trained"] == 6
        assert round(t.values[0] * 16, 6) == int(round(t.values[0] * 16))
    front = {n for n, t in done.items() if not any(_dominates(o.values, t.values) for o in done.values())}
    rows = _printed_rows(out)
    assert {int(r[0]) for r in rows} == front
    for r in rows:
        t = done[int(r[0])]
        assert r[1] == t.user_attrs["point"]["method"]
        assert float(r[2]) == round(t.values[0], 4) and int(r[3].replace(",", "")) == int(t.values[1])
        assert int(t.values[1]) == _attached_params(tiny_model_dir, t.user_attrs["point"])
    assert f"trial {max(done)}:" in out  # a progress line per trial


def _attached_params(model_dir, point) -> int:
    """Trainable parameters of the trial's configuration on the model, the head excluded."""
    import deltakit as dk
    from deltakit.io.models import load_classifier

    model, _ = load_classifier(str(model_dir), 2, seed=0)
    model = copy.deepcopy(model)
    dk.attach(model, dk.get_method(point["method"]).config(**point["settings"]))
    return dk.param_counts(model)[0]
