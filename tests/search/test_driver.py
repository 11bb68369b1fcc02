"""The driver: studies in Optuna storage, resumable; a real trial on a tiny BERT; the report."""
from __future__ import annotations

import math
from pathlib import Path

import optuna
import pytest
import yaml

from deltakit.search.driver import counts, open_storage, run_search
from deltakit.search.objectives import holdout_split
from deltakit.search.report import best_per_budget, pareto_front, write_report
from deltakit.search.spec import parse_spec

optuna.logging.set_verbosity(optuna.logging.WARNING)


def _toy(trials: int, **extra) -> dict:
    return {"name": "toy", "task": "toy", "methods": {"lora": {}, "houlsby": {}}, "trials": trials, **extra}


def test_holdout_split_is_seeded_and_disjoint():
    rows = [{"sentence": str(i), "label": i % 2} for i in range(10)]
    fit, held = holdout_split(rows, 0.3, seed=0)
    assert len(fit) == 7 and len(held) == 3
    assert sorted(r["sentence"] for r in fit + held) == sorted(r["sentence"] for r in rows)
    assert holdout_split(rows, 0.3, seed=0) == (fit, held) and holdout_split(rows, 0.3, seed=1) != (fit, held)


def test_a_study_continues_in_its_storage(tmp_path):
    url = f"sqlite:///{tmp_path / 's.db'}"
    first = run_search(parse_spec(_toy(3)), url)
    before = {t.number: t.values for t in first.trials}
    study = run_search(parse_spec(_toy(5)), url)  # the same study, a larger budget: 2 more trials
    assert counts(study) == {"COMPLETE": 5}
    assert {t.number: t.values for t in study.trials if t.number in before} == before
    again = run_search(parse_spec(_toy(5)), url)  # nothing left to do
    assert len(again.trials) == 5


def test_objectives_of_a_stored_study_cannot_change(tmp_path):
    url = f"sqlite:///{tmp_path / 's.db'}"
    run_search(parse_spec(_toy(1)), url)
    with pytest.raises(ValueError, match=r"^study 'toy': expected objectives \['metric', 'params'\] as stored, "
                                         r"found \['metric'\]; give the search another name$"):
        run_search(parse_spec(_toy(2, objectives=["metric"])), url)


def test_storage_urls():
    from optuna.storages import RDBStorage
    from optuna.storages.journal import JournalStorage

    assert isinstance(open_storage("sqlite:///:memory:"), RDBStorage)
    with pytest.raises(ValueError, match=r"^--storage: expected an RDB URL .* found 's.db'$"):
        open_storage("s.db")


def test_journal_storage_runs_a_study(tmp_path):
    study = run_search(parse_spec(_toy(3)), f"journal:{tmp_path / 'j.log'}")
    assert counts(study) == {"COMPLETE": 3}


def test_report_front_and_best_per_budget(tmp_path):
    study = run_search(parse_spec(_toy(10, sampler="random")), f"journal:{tmp_path / 's.log'}")
    trials = [t for t in study.trials if t.values]
    front = pareto_front(trials, ["metric", "params"])
    assert {t.number for t in front} == {t.number for t in study.best_trials}
    for b, t in best_per_budget(study, [10, math.inf]).items():
        fits = [u for u in trials if u.values[1] <= b]
        assert t.values[0] == max(u.values[0] for u in fits)
    rep = write_report(study, tmp_path / "rep", [10, math.inf])
    best = yaml.safe_load((tmp_path / "rep" / "best-any.yaml").read_text())
    top = max(trials, key=lambda t: t.values[0])
    assert best["trial"] == top.number and best["method"] == top.user_attrs["point"]["method"]
    assert best["command"].startswith(f"deltakit train --model minilm --train TRAIN --method {best['method']} ")
    for k, v in best["config"].items():
        assert f"--set {k}=" in best["command"]
    assert (tmp_path / "rep" / "front.png").stat().st_size > 1000
    assert rep["text"].splitlines()[0].split() == ["trial", "|", "method", "|", "metric", "|", "params", "|", "knobs"]


def _task_dir(tmp_path: Path) -> Path:
    d = tmp_path / "task"
    d.mkdir()
    words = ["good", "great", "fine", "bad", "awful", "poor"]
    rows = [f"{words[i % 6]} movie {i}\t{int(i % 6 < 3)}" for i in range(40)]
    (d / "train.tsv").write_text("sentence\tlabel\n" + "\n".join(rows) + "\n")
    (d / "dev.tsv").write_text("this is not a table\x00")  # reading dev would fail: the search never does
    return d


@pytest.mark.slow
def test_a_real_trial_trains_a_tiny_bert_through_fit(tmp_path, tiny_model_dir):
    spec = parse_spec({
        "name": "real", "trials": 2, "sampler": "random", "objectives": ["metric", "params", "bytes", "latency"],
        "task": {"model": str(tiny_model_dir), "train": str(_task_dir(tmp_path)), "holdout": 0.25,
                 "max_length": 16, "batch_size": 8},
        "methods": {"lora": {"r": [2, 4]}}, "training": {"steps": 3, "lr": 1e-3},
    })
    study = run_search(spec, f"sqlite:///{tmp_path / 's.db'}")
    assert counts(study) == {"COMPLETE": 2}
    for t in study.trials:
        metric, params, nbytes, latency = t.values
        r = t.params["lora.r"]
        assert params == 2 * 2 * r * (16 + 16)          # 2 layers x (query, value) x r (d_in + d_out)
        assert nbytes > 4 * params                      # the fp32 LoRA tensors plus the head and the header
        assert metric in {k / 10 for k in range(11)}    # accuracy on the 10 held-out rows
        assert latency > 0 and t.user_attrs["result"]["steps_trained"] == 3
    assert study.user_attrs["base_params"] > 10_000


@pytest.mark.slow
def test_real_trials_are_pruned_at_a_rung_inside_fit(tmp_path, tiny_model_dir):
    """Two objectives, rungs at 2 of 4 steps, eta 2: the rung judge runs inside fit's step
    callback; a pruned trial trained 2 steps and has no values; the budget counts it."""
    spec = parse_spec({
        "name": "rungs", "trials": 4, "sampler": "random", "fidelity": {"min_steps": 2, "eta": 2},
        "task": {"model": str(tiny_model_dir), "train": str(_task_dir(tmp_path)), "holdout": 0.25,
                 "max_length": 16, "batch_size": 8},
        "methods": {"lora": {"r": [1, 8]}}, "training": {"steps": 4, "lr": 1e-2},
    })
    study = run_search(spec, f"sqlite:///{tmp_path / 's.db'}")
    c = counts(study)
    assert c.get("COMPLETE", 0) + c.get("PRUNED", 0) == 4 and c.get("PRUNED", 0) >= 1
    for t in study.trials:
        assert "rung:2" in t.user_attrs  # every trial was judged at step 2
        assert t.user_attrs["result"]["steps_trained"] == (4 if t.state.name == "COMPLETE" else 2)


def test_bytes_after_a_codec_shrink_with_its_density(tiny_model_dir):
    import deltakit as dk
    from deltakit.search.objectives import compressed_bytes, stored_bytes
    from transformers import AutoModelForSequenceClassification

    model = AutoModelForSequenceClassification.from_pretrained(tiny_model_dir, num_labels=2)
    ad = dk.attach(model, dk.LoraConfig(r=4), name="a")
    for p in ad.parameters():
        p.data.normal_()  # B starts at zero: make the update dense
    half, tenth = (compressed_bytes(ad, "topk", {"density": d}) for d in (0.5, 0.1))
    assert tenth < half < 2 * stored_bytes(ad)
    houlsby = dk.attach(model, dk.get_method("houlsby").config(bottleneck_size=2), name="h")
    with pytest.raises(dk.ConfigError, match=r"^task.codec 'topk': expected weight deltas to compress, found "
                                             r"none in houlsby \(activation deltas\)$"):
        compressed_bytes(houlsby, "topk", {"density": 0.5})


def test_fail_running_fails_and_requeues_for_a_journal_storage(tmp_path):
    from deltakit.search.driver import fail_running, open_study

    spec = parse_spec(_toy(2))
    study = open_study(spec, open_storage(f"journal:{tmp_path / 'j.log'}"))
    t = study.ask()
    x = t.suggest_float("x", 0, 1)  # a worker died here: the journal has no heartbeat to notice
    assert fail_running(study) == [0]
    states = [(u.number, u.state.name, u.params, u.system_attrs.get("failed_trial")) for u in study.get_trials()]
    assert states == [(0, "FAIL", {"x": x}, None), (1, "WAITING", {"x": x}, 0)]
    assert fail_running(study) == []  # the WAITING retry is not running: nothing more to fail


def test_the_autopeft_preset_with_fidelity_opens_and_runs(tmp_path):
    """open_study read the fidelity's max steps from a space built without the model's layers,
    which a per-layer switch refuses: the autopeft preset plus fidelity could not start."""
    spec = parse_spec({"name": "ap", "task": "toy", "preset": "autopeft", "trials": 4,
                       "training": {"steps": 200}, "fidelity": {"min_steps": 50, "eta": 3}})
    study = run_search(spec, f"sqlite:///{tmp_path / 's.db'}")
    c = counts(study)
    assert c.get("COMPLETE", 0) + c.get("PRUNED", 0) == 4
    points = [t.user_attrs["point"] for t in study.trials]
    assert {p["method"] for p in points} == {"unified"}
    assert all(set(p["settings"]["layers"]) <= {0, 1} for p in points)  # the toy's 2 stand-in layers
