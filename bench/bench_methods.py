"""Every PEFT method on real tasks: metric against trainable parameters, on the bundled MiniLM.

The bundled all-MiniLM-L6-v2 (BERT, 6 layers, hidden 384, 22.7M parameters) is trained
on GLUE-style tasks read from ``<data>/<task>/{train,dev}.tsv`` (default
``/work/shared/data/text``, env ``DELTAKIT_GLUE_DIR`` or ``--data-dir``): SST-2 and RTE
(accuracy), MRPC (F1 of the positive class), CoLA (Matthews correlation), scored on dev.

Every registered method runs

* at its **paper default** (its config's defaults, default targets), and
* at **matched budgets** of about 0.1% and 1% of the base's parameters: the method's
  size knob (rank, bottleneck width, prompt length, density, ...; ``KNOBS``) is set to
  the value whose real trainable count (``attach`` + count, no formula) is closest to
  the budget in log scale. A method with no size knob (BitFit, LN tuning, (IA)3, SSF,
  ETHER, HFT, LISA) has only its default point; a budget the knob cannot reach within
  a factor of 1.5 is recorded as unreachable, not run.

plus **full fine-tuning** as reference. Counts exclude the classification head
(``classifier``, 770 parameters), which every method trains in full.

Same for every method: seed, rows, steps, batch size, linear schedule with 10% warm-up,
bf16 autocast with fp32 master weights, eager attention (SDPA's bf16 backward is slow on
CPU). Steps, max length and rows are set **per task** (``task_protocol``, batch 16: SST-2
200 steps x 64 tokens, MRPC 300 x 128, RTE 200 x 128, each about one pass over its rows;
CoLA 800 x 64 over 3200 rows, four passes): at a uniform 100 steps MRPC, CoLA and RTE
stayed at the majority class for every method, full fine-tuning included, and CoLA still
did after one pass over 8000 rows (500 steps). **Learning rate**: every method gets the same grid
``lrs``; the best LR per method is chosen at its default setting by a short probe
(``select_steps`` on ``select_n_train`` rows of SST-2) scored on a held-out **selection
split** of SST-2's training file (never trained on, never dev), then used for that method
on every task and budget. Budget points run on ``budget_tasks`` (SST-2 and MRPC by
default; every task costs about 4 h more on 2 cores).

Recorded per run: dev metric (and accuracy), trainable and stored parameters (bytes of
the saved adapter directory), train time, peak RSS of the worker during the run
(kernel high-water mark reset before it), load average. Runs are spread over
``workers`` processes with ``threads`` torch threads each (2 x 1 on a 2-core machine:
small matmuls scale poorly with threads). Work is ordered by importance (LR selection,
then defaults on every task, then budgets) and stops being scheduled at
``--budget-min``; skipped runs are listed. Finished runs are cached in ``--cache-dir``
so a rerun resumes.

Writes ``bench/results/methods.{json,md,png}`` (``--quick``: tiny sizes, under the
cache directory).

    python bench/bench_methods.py [--quick] [--budget-min 110] [--tasks sst2,rte,mrpc,cola]
    deltakit bench methods [--quick]
"""
from __future__ import annotations

import argparse
import concurrent.futures as cf
import dataclasses
import hashlib
import json
import math
import multiprocessing as mp
import sys
import time
from pathlib import Path

import torch

from _common import RESULTS, Log, machine_info, write_json
from peft_methods.config import ADAPTED, DEFAULT_CACHE, DEFAULT_DATA, FULL, LR_TASK, QUICK, Config
from peft_methods.counting import points as count_points
from peft_methods.report import write_report
from peft_methods.worker import run_one, worker_init


# ----------------------------------------------------------------------------- driver
def _job_key(cfg: Config, job: dict) -> str:
    ident = json.dumps({k: job[k] for k in ("method", "settings", "lr", "task", "split")}, sort_keys=True,
                       default=str)
    return cfg.key(job["split"], job["task"]) + "-" + hashlib.sha256(ident.encode()).hexdigest()[:16]


def _methods(cfg: Config) -> list[str]:
    import deltakit as dk

    names = list(dk.list_methods()) if not cfg.methods else list(cfg.methods)
    # the registered "full" method is the trainable-copy helper behind modules_to_save; the
    # full fine-tuning reference is the plain model with every parameter trained ("full_ft")
    return [FULL] + [n for n in names if n not in ("full", FULL)]  # the reference runs first


class Scheduler:
    """Runs jobs over worker processes: cached ones are read, the rest scheduled until the
    deadline (a job that would end after it is skipped and listed); each result is cached."""

    def __init__(self, cfg: Config, cache: Path, deadline: float, log) -> None:
        self.cfg, self.cache, self.deadline, self.log = cfg, cache, deadline, log
        self.done: dict[str, dict] = {}
        self.skipped: list[dict] = []
        self.est = 60.0  # running estimate of one run's duration, for the deadline
        self.pool = cf.ProcessPoolExecutor(cfg.workers, mp_context=mp.get_context("spawn"), initializer=worker_init,
                                           initargs=(cfg.threads,))

    def result(self, job: dict) -> dict | None:
        return self.done.get(_job_key(self.cfg, job))

    def execute(self, jobs: list[dict], desc: str) -> None:
        from tqdm import tqdm

        todo = []
        for j in jobs:
            f = self.cache / "runs" / f"{_job_key(self.cfg, j)}.json"
            if f.exists():
                self.done[_job_key(self.cfg, j)] = json.loads(f.read_text())
            else:
                todo.append(j)
        bar = tqdm(total=len(todo), desc=desc, dynamic_ncols=True)
        pending: dict = {}
        it = iter(todo)
        durations: list[float] = []
        for _ in range(self.cfg.workers * 2):
            self._submit_next(it, pending)
        while pending:
            fin, _ = cf.wait(list(pending), return_when=cf.FIRST_COMPLETED)
            for f in fin:
                j, t0 = pending.pop(f)
                self._finish(f, j)
                durations.append(time.time() - t0)
                self.est = sorted(durations)[len(durations) // 2]
                bar.update(1)
                bar.set_postfix_str(f"{j['method']}/{j['label']}/{j['task']}")
                self._submit_next(it, pending)
        bar.close()

    def _submit_next(self, it, pending: dict) -> bool:
        for j in it:
            if time.time() + self.est / max(self.cfg.workers, 1) > self.deadline:
                self.skipped.append(j)
                continue
            pending[self.pool.submit(run_one, self.cfg, j)] = (j, time.time())
            return True
        return False

    def _finish(self, fut, j: dict) -> None:
        try:
            r = fut.result()
        except Exception as e:  # a method that fails here is a finding, not a crash of the bench
            r = {**j, "error": f"{type(e).__name__}: {str(e).splitlines()[0][:300]}"}
            self.log(f"FAILED {j['method']} {j['label']} {j['task']} lr={j['lr']}: {r['error']}")
        key = _job_key(self.cfg, j)
        self.done[key] = r
        write_json(self.cache / "runs" / f"{key}.json", r)


def _job(m: str, p: dict, task: str, lr: float, split: str) -> dict:
    return {"method": m, "label": p["label"], "settings": p["settings"], "task": task, "lr": lr, "split": split}


def run(quick: bool = False, out_dir: str | Path | None = None, cache_dir: str | Path | None = None,
        **overrides) -> dict:
    """LR per method, then every method's default on every task, then the budget points."""
    from tqdm import tqdm

    cfg = Config(**{**(QUICK if quick else {}), **overrides})
    cache = Path(cache_dir or DEFAULT_CACHE) / ("quick" if quick else "full")
    (cache / "runs").mkdir(parents=True, exist_ok=True)
    out = Path(out_dir) if out_dir else (cache if quick else RESULTS)
    t_start = time.time()
    log = Log(keep=True, load=False, echo=tqdm.write)
    torch.set_num_threads(max(1, cfg.threads))
    _seed_cache(cfg, out / "methods.json", cache / "runs", log)
    methods = _methods(cfg)
    points = count_points(cfg, methods, cache, log)
    sched = Scheduler(cfg, cache, t_start + 60 * cfg.budget_min, log)
    # 1. learning rate per method: default setting, selection split of LR_TASK
    methods = [m for m in methods if points[m][0]["reachable"]]
    lr_jobs, best_lr, lr_table = _select_lrs(cfg, sched, methods, points, log)
    # 2. defaults on every task, method-major, so a time budget cuts whole rows rather than one
    # task of every row; then 3. budget points, task-major: a time budget cuts the later
    # (costlier) budget task, not half of every method
    main_jobs = [_job(m, points[m][0], t, best_lr[m], "dev") for m in methods if m in best_lr for t in cfg.tasks]
    sched.execute(main_jobs, "defaults")
    budget_jobs = [_job(m, p, t, best_lr[m], "dev") for t in cfg.tasks if t in cfg.budget_tasks
                   for p_i in range(1, 1 + len(cfg.budgets))
                   for m in methods if m in best_lr and len(points[m]) > p_i and points[m][p_i]["reachable"]
                   for p in [points[m][p_i]]]
    sched.execute(budget_jobs, "budgets")
    sched.pool.shutdown()
    result = {"config": dataclasses.asdict(cfg),
              "key": {"select": cfg.key("select"), "dev": {t: cfg.key("dev", t) for t in cfg.tasks}},
              "machine": _machine(), "points": points, "adapted": ADAPTED,
              "lr_runs": [r for r in map(sched.result, lr_jobs) if r is not None],
              "lr_selection": lr_table, "best_lr": best_lr,
              "runs": [r for r in map(sched.result, main_jobs + budget_jobs) if r is not None],
              "skipped": [{k: j[k] for k in ("method", "label", "task")} for j in sched.skipped],
              "unreachable": [{"method": m, **p} for m, ps in points.items() for p in ps if not p["reachable"]],
              "wall_s": time.time() - t_start, "log": log.lines}
    write_report(result, out)
    return result


def _select_lrs(cfg: Config, sched: Scheduler, methods: list[str], points: dict, log):
    """Each method at its default on every LR of the grid, scored on the selection split; the
    best (ties: the smaller LR) -> (jobs, {method: LR}, {method: {LR: metric}})."""
    lr_task = LR_TASK if LR_TASK in cfg.tasks else cfg.tasks[0]
    lr_jobs = [_job(m, points[m][0], lr_task, lr, "select") for m in methods for lr in cfg.lrs]
    sched.execute(lr_jobs, "LR selection")
    best_lr: dict[str, float] = {}
    lr_table: dict[str, dict] = {}
    for m in methods:
        rs = [sched.result(j) for j in lr_jobs if j["method"] == m]
        rs = [r for r in rs if r and "error" not in r and not math.isnan(r["metric"])]
        lr_table[m] = {str(r["lr"]): r["metric"] for r in rs}
        if rs:
            best_lr[m] = max(rs, key=lambda r: (r["metric"], -r["lr"]))["lr"]
    log("chosen LR: " + ", ".join(f"{m}={v:g}" for m, v in best_lr.items()))
    return lr_jobs, best_lr, lr_table


def _seed_cache(cfg: Config, previous: Path, runs_dir: Path, log) -> None:
    """Runs recorded in an earlier report with the same configuration count as done, so a
    benchmark cut by its time budget resumes on another machine from the committed JSON."""
    if not previous.exists():
        return
    try:
        old = json.loads(previous.read_text())
    except (OSError, ValueError):
        return
    keys = old.get("key")
    keys = keys if isinstance(keys, dict) else {"select": keys}  # protocol 2 had one key
    n = 0
    for r in [*old.get("lr_runs", []), *old.get("runs", [])]:
        want = keys.get(r["split"])
        want = want.get(r["task"]) if isinstance(want, dict) else want
        if "error" in r or want != cfg.key(r["split"], r["task"]):
            continue  # failures are retried; runs of another protocol do not count
        f = runs_dir / f"{_job_key(cfg, r)}.json"
        if not f.exists():
            write_json(f, r)
            n += 1
    log(f"resumed {n} finished runs from {previous}")


def _machine() -> dict:
    import deltakit

    return machine_info("transformers") | {"deltakit": deltakit.__version__}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--quick", action="store_true", help="tiny sizes, a few methods (smoke run)")
    p.add_argument("--data-dir", default=DEFAULT_DATA)
    p.add_argument("--cache-dir", default=DEFAULT_CACHE)
    p.add_argument("--out-dir", default=None)
    p.add_argument("--tasks", default=None, help="comma-separated (default sst2,rte,mrpc,cola)")
    p.add_argument("--methods", default=None, help="comma-separated (default: every registered method)")
    p.add_argument("--budget-tasks", default=None, help="comma-separated (default sst2,mrpc)")
    p.add_argument("--workers", type=int, default=None)
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--budget-min", type=float, default=None)
    p.add_argument("--report-only", action="store_true", help="rewrite md/png from the existing methods.json")
    a = p.parse_args(argv)
    if a.report_only:
        out = Path(a.out_dir) if a.out_dir else RESULTS
        write_report(json.loads((out / "methods.json").read_text()), out)
        return 0
    over = {"data_dir": a.data_dir}
    for name, val in (("tasks", a.tasks), ("methods", a.methods), ("budget_tasks", a.budget_tasks)):
        if val:
            over[name] = tuple(val.split(","))
    for name in ("workers", "threads", "budget_min"):
        if getattr(a, name) is not None:
            over[name] = getattr(a, name)
    run(quick=a.quick, out_dir=a.out_dir, cache_dir=a.cache_dir, **over)
    return 0


if __name__ == "__main__":
    sys.exit(main())
