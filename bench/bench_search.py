"""Configuration search against hand-picked defaults: deltakit.search's front vs every method's default.

On the bundled all-MiniLM-L6-v2 (22.7M parameters) and three single-sentence tasks of
``<data>/<task>/{train,dev}.tsv`` where fine-tuning is far above the majority class (SST-2,
TREC, SUBJ by default; default ``/work/shared/data/text``, env ``DELTAKIT_GLUE_DIR``), per task:

1. **every method's default point** trained and scored on dev exactly as the methods
   benchmark does (``bench/peft_methods``: its LR per method from ``methods.json``, 200 steps x
   batch 16 x 64 tokens over 3200 rows, bf16 autocast), full fine-tuning included; runs the
   methods benchmark already recorded (SST-2) are reused from ``methods.json``;
2. **the search**: ``deltakit.search``'s cross-method space (every registered PEFT method, each
   one's knobs from its config's declarations; ``unified`` with AutoPEFT's space: adapter size,
   serial / parallel, prefix length, per-layer on/off) plus the learning rate, objectives =
   the task metric on a held-out 20% of the training rows (never dev) and trainable parameters,
   TPE, MO-ASHA on steps (rungs at 1/9 and 1/3 of the steps, eta 3), with the **same total
   training compute as step 1** (steps x batch summed over trials; see ``search/config.py``);
3. **the front on dev**: the Pareto front's configurations (at most ``max_front``, spread over
   log parameters, the best one under each budget always in) re-trained with step 1's protocol
   and scored on dev.

Report: the front against every default and full fine-tuning, and whether at ~0.1% and ~1%
of the base's parameters (trainable <= 1.5 x the budget) the front beats the best default by
>= 1 point. Per-run results are cached (``--cache-dir``, shared format with the methods
benchmark) and the study lives in SQLite there, so a killed run continues where it stopped.

Writes ``bench/results/search.{json,md,png}`` (or ``--out``).

    python bench/bench_search.py [--tasks sst2,trec,subj] [--budget-scale 1] [--out DIR]
    deltakit bench search --tasks sst2 --budget-scale 0.1     # a reduced real run
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import math
import sys
import time
from pathlib import Path

from _common import RESULTS, Log, load_avg, machine_info, read_json
from search.config import DEFAULT_CACHE, BenchConfig, budget_examples, default_methods, methods_config, search_doc
from search.report import pick_front, write_report
from search.study import Progress, run_bounded, spent_examples


def _default_jobs(methods: list[str], best_lr: dict, task: str) -> list[dict]:
    from peft_methods.config import ADAPTED

    return [{"method": m, "label": "default", "settings": ADAPTED.get(m, {}), "task": task, "lr": best_lr[m],
             "split": "dev"} for m in methods]


def _front_job(t, task: str) -> dict:
    p = t.user_attrs["point"]
    return {"method": p["method"], "label": f"search#{t.number}", "settings": p["settings"], "task": task,
            "lr": float(p["training"]["lr"]), "split": "dev"}


def _best_lr(methods: list[str]) -> dict[str, float]:
    """Each method's LR as the methods benchmark chose it (a probe on SST-2's selection split)."""
    path = RESULTS / "methods.json"
    if not path.is_file():
        raise FileNotFoundError(f"expected {path} (each method's LR); run 'deltakit bench methods' first")
    best = read_json(path)["best_lr"]
    missing = [m for m in methods if m not in best]
    if missing:
        raise KeyError(f"methods.json best_lr: expected every method, found none for {missing}")
    return best


def run_task(cfg: BenchConfig, task: str, sched, methods: list[str], best_lr: dict, url: str, log) -> dict:
    """Defaults on dev, the compute-matched search, the front on dev: one task's record."""
    from deltakit.search.report import complete_trials, pareto_front

    steps, max_length, n_fit = sched.cfg.protocol(task)
    t0 = time.time()
    jobs = _default_jobs(methods, best_lr, task)
    sched.execute(jobs, f"{task} defaults")
    walls = {"defaults_s": round(time.time() - t0)}
    raw = search_doc(cfg, task, steps, max_length, n_fit)
    budget = budget_examples(cfg, steps, len(methods))
    log(f"[{task}] search {raw['name']}: budget {budget:,} examples = {len(methods)} default runs x {steps} steps "
        f"x batch {cfg.batch_size} x scale {cfg.budget_scale:g}; load {load_avg()}")
    t1 = time.time()
    study = run_bounded(raw, url, budget, workers=cfg.workers, threads=cfg.threads,
                        progress=Progress(task, budget, cfg.batch_size, log))
    walls["search_s"] = round(time.time() - t1)
    front = pareto_front(complete_trials(study), ["metric", "params"])
    base = study.user_attrs["base_params"]
    picked = pick_front(front, base, cfg.max_front, cfg.budgets, cfg.window)
    fjobs = [_front_job(t, task) for t in picked]
    t2 = time.time()
    sched.execute(fjobs, f"{task} front on dev")
    walls["front_s"] = round(time.time() - t2)
    by_number = {t.number: t for t in picked}
    front_rows = []
    for j in fjobs:
        t = by_number[int(j["label"].split("#")[1])]
        front_rows.append({**(sched.result(j) or {**j, "error": "not run"}), "trial": t.number,
                           "holdout_metric": t.values[0], "search_params": int(t.values[1])})
    return {"steps": steps, "max_length": max_length, "n_fit": n_fit, "study": raw["name"], "search_doc": raw,
            "compute": {"budget_examples": budget, "default_runs": len(methods), **spent_examples(study, cfg.batch_size),
                        "front_eval_examples": len(fjobs) * steps * cfg.batch_size},
            "defaults": [sched.result(j) for j in jobs], "front": front_rows, "front_size": len(front),
            "trials": [_trial_row(t) for t in complete_trials(study)], "base_params": base, "wall": walls,
            "load_end": load_avg()}


def _trial_row(t) -> dict:
    p = t.user_attrs.get("point", {})
    return {"trial": t.number, "method": p.get("method"), "holdout_metric": t.values[0], "params": int(t.values[1])}


def run(cfg: BenchConfig, out: Path, cache: Path) -> dict:
    from tqdm import tqdm

    from bench_methods import Scheduler, _seed_cache

    mcfg = methods_config(cfg)
    (cache / "runs").mkdir(parents=True, exist_ok=True)
    log = Log(keep=True, echo=lambda line: (tqdm.write(line), sys.stdout.flush()))  # flushed: a log file follows
    methods = default_methods()
    best_lr = _best_lr(methods)
    _seed_cache(mcfg, RESULTS / "methods.json", cache / "runs", log)
    sched = Scheduler(mcfg, cache, math.inf, log)
    url = f"sqlite:///{cache / 'search.db'}"
    result = {"config": dataclasses.asdict(cfg), "machine": _machine(), "tasks": {}, "log": log.lines}
    t0 = time.time()
    try:
        for task in cfg.tasks:
            result["tasks"][task] = run_task(cfg, task, sched, methods, best_lr, url, log)
            result["wall_s"] = round(time.time() - t0)
            write_report(result, out)  # after every task: a cut run still leaves its finished tasks
    finally:
        sched.pool.shutdown()
    return result


def _machine() -> dict:
    import deltakit

    return machine_info("transformers", "optuna") | {"deltakit": deltakit.__version__}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--tasks", default=None, help="comma-separated (default sst2,trec,subj)")
    p.add_argument("--budget-scale", type=float, default=1.0,
                   help="the search's compute as a fraction of the methods benchmark's default sweep (default 1; "
                        "0.1 for a reduced run)")
    p.add_argument("--out", default=None, help="output directory (default bench/results)")
    p.add_argument("--data-dir", default=None)
    p.add_argument("--cache-dir", default=DEFAULT_CACHE, help="per-run cache and the search's SQLite study")
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--max-front", type=int, default=12, help="front points re-trained and scored on dev")
    p.add_argument("--report-only", action="store_true", help="rewrite md/png from the existing search.json")
    a = p.parse_args(argv)
    out = Path(a.out) if a.out else RESULTS
    if a.report_only:
        write_report(json.loads((out / "search.json").read_text()), out)
        return 0
    if a.budget_scale <= 0:
        raise ValueError(f"--budget-scale: expected a number > 0, found {a.budget_scale}")
    over = {"budget_scale": a.budget_scale, "workers": a.workers, "threads": a.threads, "max_front": a.max_front}
    if a.tasks:
        over["tasks"] = tuple(a.tasks.split(","))
    if a.data_dir:
        over["data_dir"] = a.data_dir
    run(BenchConfig(**over), out, Path(a.cache_dir))
    return 0


if __name__ == "__main__":
    sys.exit(main())
