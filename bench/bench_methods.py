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
import os
import platform
import shutil
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
DEFAULT_DATA = os.environ.get("DELTAKIT_GLUE_DIR", "/work/shared/data/text")
DEFAULT_CACHE = os.environ.get("DELTAKIT_BENCH_CACHE", "/tmp/deltakit_bench_methods")
TASK_METRIC = {"sst2": "accuracy", "rte": "accuracy", "mrpc": "f1", "cola": "mcc", "qnli": "accuracy"}
LR_TASK = "sst2"
FULL = "full_ft"

# Paper defaults that do not fit MiniLM's widths, adapted (recorded in the JSON): VB-LoRA's
# sub-vector length 256 must divide every target width (384, 1536); 192 is the closest that does.
ADAPTED: dict[str, dict] = {"vb_lora": {"vector_length": 192}}

# method -> (settings for knob value v, low, high, kind); count(v) must be non-decreasing.
# LoKr's size is its Kronecker split (LyCORIS's ``factor``, with full factors): its rank only
# applies to factors already smaller than r here, so r cannot size it.
_INT, _FLOAT = "int", "float"
KNOBS: dict[str, tuple] = {
    "lora": (lambda v: {"r": v, "alpha": 2.0 * v}, 1, 512, _INT),
    "dora": (lambda v: {"r": v, "alpha": 2.0 * v}, 1, 512, _INT),
    "pissa": (lambda v: {"r": v, "alpha": 2.0 * v}, 1, 512, _INT),
    "lora_fa": (lambda v: {"r": v, "alpha": 2.0 * v}, 1, 1024, _INT),
    "tied_lora": (lambda v: {"r": v, "alpha": 2.0 * v}, 1, 384, _INT),
    "adalora": (lambda v: {"init_r": v + (v + 1) // 2, "target_r": v, "alpha": 1.5 * v}, 1, 256, _INT),
    "increlora": (lambda v: {"target_r": v, "max_r": 2 * v, "init_r": max(1, v // 4),
                             "alpha": float(v)}, 1, 192, _INT),
    "vera": (lambda v: {"r": v}, 1, 8192, _INT),
    "nola": (lambda v: {"num_basis_A": v, "num_basis_B": v}, 1, 16384, _INT),
    "vb_lora": (lambda v: {"num_vectors": v, **ADAPTED["vb_lora"]}, 4, 16384, _INT),
    "mos": (lambda v: {"equivalent_rank": v, "r": 4 * v, "alpha": 8.0 * v}, 1, 256, _INT),  # default r = 4 x eq
    "loha": (lambda v: {"r": v, "alpha": float(v)}, 1, 256, _INT),
    "flora": (lambda v: {"r": v}, 1, 256, _INT),
    "loretta": (lambda v: {"tt_rank": v}, 1, 128, _INT),
    "oft": (lambda v: {"block_size": v, "r": 0}, 1, 384, "divisor"),
    "lokr": (lambda v: {"factor": v, "full_matrix": True}, 1, 384, "divisor"),  # count falls as factor grows
    "houlsby": (lambda v: {"bottleneck_size": v}, 1, 1536, _INT),
    "pfeiffer": (lambda v: {"bottleneck_size": v}, 1, 1536, _INT),
    "parallel_adapter": (lambda v: {"bottleneck_size": v}, 1, 1536, _INT),
    "scaled_parallel": (lambda v: {"bottleneck_size": v}, 1, 1536, _INT),
    "compacter": (lambda v: {"bottleneck_size": 4 * v}, 1, 384, _INT),
    "compacter_pp": (lambda v: {"bottleneck_size": 4 * v}, 1, 384, _INT),
    "prompt_tuning": (lambda v: {"num_virtual_tokens": v}, 1, 128, _INT),
    "prefix_tuning": (lambda v: {"num_virtual_tokens": v}, 1, 128, _INT),
    "dept": (lambda v: {"num_virtual_tokens": v, "r": v}, 1, 128, _INT),
    "unified": (lambda v: {"r": v}, 1, 1536, _INT),
    "mam": (lambda v: {"r": v}, 1, 1536, _INT),
    "sparse_random": (lambda v: {"density": v}, 1e-5, 0.5, _FLOAT),
    "sara": (lambda v: {"density": v}, 1e-5, 0.5, _FLOAT),
    "sparse_grad": (lambda v: {"density": v}, 1e-5, 0.5, _FLOAT),
    "intrinsic": (lambda v: {"d": v}, 10, 10**6, _INT),
}


@dataclass(frozen=True)
class Config:
    data_dir: str = DEFAULT_DATA
    tasks: tuple[str, ...] = ("sst2", "rte", "mrpc", "cola")
    methods: tuple[str, ...] = ()            # empty: every registered method
    budgets: tuple[float, ...] = (0.001, 0.01)
    budget_tasks: tuple[str, ...] = ("sst2", "mrpc")  # where the budget points run (time)
    lrs: tuple[float, ...] = (1e-4, 1e-3, 1e-2)
    # LR selection probe: select_steps on select_n_train rows of LR_TASK, scored on n_select
    # held-out rows of the same training file
    select_steps: int = 100
    select_n_train: int = 1600
    select_max_length: int = 96
    n_select: int = 400
    # dev runs, per task: (steps, max_length, fit rows); 0 fit rows = steps x batch (one pass),
    # capped by what the training file has besides the selection rows
    task_protocol: tuple[tuple[str, int, int, int], ...] = (
        ("sst2", 200, 64, 0), ("mrpc", 300, 128, 0), ("rte", 200, 128, 0), ("cola", 800, 64, 3200))
    n_dev: int | None = None                 # None: the whole dev file
    batch_size: int = 16
    seed: int = 0
    bf16: bool = True
    workers: int = 2
    threads: int = 1
    budget_min: float = 110.0

    def protocol(self, task: str) -> tuple[int, int, int]:
        """(steps, max_length, fit rows) of dev runs on ``task``."""
        for t, steps, length, n_fit in self.task_protocol:
            if t == task:
                return steps, length, n_fit or steps * self.batch_size
        raise KeyError(f"task_protocol: expected an entry for {task!r}, found {[t for t, *_ in self.task_protocol]}")

    def key(self, split: str = "dev", task: str | None = None) -> str:
        """What a cached run depends on (not the scheduling knobs); a dev run, on its task's protocol."""
        # LR-probe runs keep protocol 2's key (same fields, same values), so they are reused
        keep = {"protocol": 2, "n_train": self.select_n_train, "n_select": self.n_select, "n_dev": self.n_dev,
                "steps": self.select_steps, "batch_size": self.batch_size, "max_length": self.select_max_length,
                "seed": self.seed, "bf16": self.bf16, "lrs": list(self.lrs)}
        if split != "select":  # 4: per-task steps, lengths and rows for dev runs, keyed per task
            keep |= {"protocol": 4, "task": task, "task_protocol": list(self.protocol(task))}
        return hashlib.sha256(json.dumps(keep, sort_keys=True).encode()).hexdigest()[:12]


QUICK = dict(tasks=("sst2", "rte"), methods=("lora", "bitfit", "houlsby", "prompt_tuning"),
             budget_tasks=("sst2",), lrs=(1e-3, 1e-2), select_steps=4, select_n_train=48, select_max_length=64,
             n_select=24, task_protocol=(("sst2", 4, 64, 0), ("rte", 3, 64, 0)), n_dev=32, batch_size=8,
             budget_min=10.0)


# ----------------------------------------------------------------------------- data
def _rows(cfg: Config, task: str) -> dict[str, list[dict]]:
    """select / probe / fit / dev rows of one task.

    One seeded shuffle of the training file: ``select`` = rows [select_n_train,
    select_n_train + n_select), ``probe`` (LR selection's fit rows) = the first
    select_n_train, ``fit`` (dev runs) = every other row in order, first steps x batch of
    them. The selection rows are never trained on in any run.
    """
    import random

    from deltakit.train.data import load_glue_dir

    train = load_glue_dir(Path(cfg.data_dir) / task, "train")
    dev = load_glue_dir(Path(cfg.data_dir) / task, "dev")
    rng = random.Random(cfg.seed)
    order = list(range(len(train)))
    rng.shuffle(order)
    a, b = cfg.select_n_train, cfg.select_n_train + cfg.n_select
    n_fit = cfg.protocol(task)[2] if task in {t for t, *_ in cfg.task_protocol} else cfg.select_n_train
    rest = order[:a] + order[b:]
    if cfg.n_dev is not None:
        dev = dev[:cfg.n_dev]
    return {"probe": [train[i] for i in order[:a]], "select": [train[i] for i in order[a:b]],
            "fit": [train[i] for i in rest[:n_fit]], "dev": dev}


# ----------------------------------------------------------------------------- counting
_BASE_CACHE: dict = {}


def _base(num_labels: int = 2):
    from deltakit.io.models import load_classifier

    if num_labels not in _BASE_CACHE:
        _BASE_CACHE[num_labels] = load_classifier("minilm", num_labels, seed=0, attn_implementation="eager")
    return _BASE_CACHE[num_labels]


def _settings(method: str, extra: dict, model) -> dict:
    from deltakit.io.models import head_modules

    return {"modules_to_save": head_modules(model), **extra}


def _head_params(model) -> int:
    from deltakit.io.models import head_modules

    return sum(p.numel() for h in head_modules(model) for p in model.get_submodule(h).parameters())


def count(method: str, extra: dict) -> int:
    """Trainable parameters of ``method`` with ``extra`` settings on MiniLM, head excluded."""
    import copy

    import deltakit as dk

    base, _ = _base()
    model = copy.deepcopy(base)
    spec = dk.get_method(method)
    ad = dk.attach(model, spec.config(**_settings(method, extra, model)))
    trainable, _ = dk.param_counts(model)
    del ad
    return trainable - _head_params(base)


def _divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


def match_budget(method: str, target: int, cache: dict) -> dict:
    """The knob value whose trainable count is closest to ``target`` in log scale."""
    fn, lo, hi, kind = KNOBS[method]

    def c(v):
        k = repr(v)
        if k not in cache:
            try:
                cache[k] = count(method, fn(v))
            except Exception as e:  # a knob value the method refuses (e.g. OFT block sizes)
                cache[k] = None
                cache[k + ":error"] = str(e).splitlines()[0][:200]
        return cache[k]

    def err(v):
        n = c(v)
        return math.inf if not n else abs(math.log(n / target))

    if kind == "divisor":
        cands = [d for d in _divisors(hi) if d >= lo]
    elif kind == _INT:
        a, b = lo, hi  # smallest v with count(v) >= target, by bisection (counts are monotone)
        while a < b:
            m = (a + b) // 2
            n = c(m)
            if n is not None and n >= target:
                b = m
            else:
                a = m + 1
        cands = [v for v in (a - 1, a) if lo <= v <= hi]
    else:
        a, b = math.log(lo), math.log(hi)
        for _ in range(18):
            m = (a + b) / 2
            n = c(math.exp(m))
            if n is not None and n >= target:
                b = m
            else:
                a = m
        cands = [float(f"{math.exp(b):.4g}")]
    best = min(cands, key=err)
    n = c(best)
    return {"value": best, "settings": fn(best), "trainable": n,
            "reachable": n is not None and err(best) <= math.log(1.5)}


# ----------------------------------------------------------------------------- one run (worker)
def _worker_init(threads: int) -> None:
    torch.set_num_threads(threads)
    os.environ["TOKENIZERS_PARALLELISM"] = "false"
    from transformers.utils import logging
    logging.set_verbosity_error()


def _status_kb(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    return 0


_DATA: dict = {}


def run_one(cfg: Config, job: dict) -> dict:
    """Train ``job['method']`` with ``job['settings']`` at ``job['lr']`` on one task; score ``job['split']``."""
    import copy

    import deltakit as dk
    from deltakit.train import evaluate, fit
    from deltakit.train.data import make_loader, num_labels

    task = job["task"]
    if task not in _DATA:
        _DATA[task] = _rows(cfg, task)
    rows = _DATA[task]
    k = max(2, num_labels(rows["fit"], rows["dev"]))
    base, tok = _base(k)
    model = copy.deepcopy(base)
    try:
        Path("/proc/self/clear_refs").write_text("5")  # reset the RSS high-water mark to now
    except OSError:
        pass
    load0 = os.getloadavg()[0]
    t0 = time.perf_counter()
    if job["method"] == FULL:
        ad = None
        for p in model.parameters():
            p.requires_grad_(True)
    else:
        spec = dk.get_method(job["method"])
        ad = dk.attach(model, spec.config(**_settings(job["method"], job["settings"], model)))
    trainable, total = dk.param_counts(model)
    if job["split"] == "select":  # the LR probe
        fit_rows, steps, max_length = rows["probe"], cfg.select_steps, cfg.select_max_length
    else:
        (steps, max_length, _), fit_rows = cfg.protocol(task), rows["fit"]
    train_loader = make_loader(fit_rows, tok, batch_size=cfg.batch_size, max_length=max_length,
                               shuffle=True, seed=cfg.seed)
    eval_loader = make_loader(rows[job["split"]], tok, batch_size=64, max_length=max_length)
    metric = TASK_METRIC[task]
    params, callbacks = ad.training_hooks(loader=train_loader, total_steps=steps) if ad else (None, [])
    torch.manual_seed(cfg.seed)
    # autocast per step (fit's argument), not one block around fit: a block caches each
    # weight's bf16 cast, so plain nn.Linear weights would never change in the forward
    res = fit(model, train_loader, lr=job["lr"], max_steps=steps, warmup_steps=max(1, steps // 10),
              schedule="linear", seed=cfg.seed, progress=False, params=params, callbacks=callbacks,
              log_every=max(1, steps // 5), autocast=torch.bfloat16 if cfg.bf16 else None)
    train_s = time.perf_counter() - t0
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=cfg.bf16):
        scores = evaluate(model, eval_loader, metric=sorted({metric, "accuracy"}))
    peak_mb = _status_kb("VmHWM") / 1024
    losses = [h["loss"] for h in res.history if "loss" in h]
    if ad is None:  # a full checkpoint: every parameter in its dtype
        stored = sum(p.numel() * p.element_size() for p in model.parameters())
    else:
        with tempfile.TemporaryDirectory() as d:
            dk.save_adapter(ad, Path(d) / "a")
            stored = sum(f.stat().st_size for f in (Path(d) / "a").iterdir() if f.suffix == ".safetensors")
    head = _head_params(base)
    finite = all(math.isfinite(x) for x in losses)
    return {**job, "metric_name": metric, "metric": scores[metric] if finite else float("nan"),
            "accuracy": scores["accuracy"], "final_loss": losses[-1] if losses else None,
            "diverged": not finite, "trainable": trainable - head, "head": head,
            "base_total": sum(p.numel() for p in base.parameters()), "stored_bytes": stored,
            "steps": steps, "max_length": max_length, "n_fit": len(fit_rows),
            "train_s": train_s, "peak_rss_mb": peak_mb, "loadavg_1m": [round(load0, 2),
                                                                       round(os.getloadavg()[0], 2)]}


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


def _points(cfg: Config, methods: list[str], cache_dir: Path, log) -> dict[str, list[dict]]:
    """method -> [{label, settings, trainable, reachable}] for default and each budget."""
    path = cache_dir / f"knobs-{cfg.key('select')}.json"  # counts depend on the model only
    knob_cache = json.loads(path.read_text()) if path.exists() else {}
    base, _ = _base()
    total = sum(p.numel() for p in base.parameters())
    out: dict[str, list[dict]] = {}
    for m in methods:
        default = dict(ADAPTED.get(m, {}))
        try:
            n0 = None if m == FULL else count(m, default)
        except Exception as e:  # a method that cannot attach here is reported, not fatal
            log(f"knobs {m}: default does not attach: {type(e).__name__}: {str(e).splitlines()[0][:200]}")
            out[m] = [{"label": "default", "settings": default, "trainable": None, "reachable": False,
                       "error": str(e).splitlines()[0][:300]}]
            continue
        pts = [{"label": "default", "settings": default, "trainable": n0, "reachable": True}]
        if m in KNOBS:
            mc = knob_cache.setdefault(m, {})
            for b in cfg.budgets:
                r = match_budget(m, int(round(b * total)), mc)
                pts.append({"label": f"{100 * b:g}%", **r})
        out[m] = pts
        log(f"knobs {m}: " + ", ".join(f"{p['label']}={p.get('value', '-')}"
                                        f"({p['trainable'] if p['trainable'] is not None else '?'})"
                                        for p in pts))
        from deltakit.io.files import write_json
        write_json(path, knob_cache)
    return out


def run(quick: bool = False, out_dir: str | os.PathLike | None = None, cache_dir: str | os.PathLike | None = None,
        **overrides) -> dict:
    from tqdm import tqdm

    from deltakit.io.files import write_json

    cfg = Config(**{**(QUICK if quick else {}), **overrides})
    cache = Path(cache_dir or DEFAULT_CACHE) / ("quick" if quick else "full")
    (cache / "runs").mkdir(parents=True, exist_ok=True)
    out = Path(out_dir) if out_dir else (cache if quick else HERE / "results")
    t_start = time.time()
    deadline = t_start + 60 * cfg.budget_min
    logs: list[str] = []

    def log(msg: str) -> None:
        line = f"[{time.time() - t_start:7.1f}s] {msg}"
        logs.append(line)
        tqdm.write(line)

    torch.set_num_threads(max(1, cfg.threads))
    _seed_cache(cfg, out / "methods.json", cache / "runs", log)
    methods = _methods(cfg)
    points = _points(cfg, methods, cache, log)

    done: dict[str, dict] = {}
    ctx = mp.get_context("spawn")
    pool = cf.ProcessPoolExecutor(cfg.workers, mp_context=ctx, initializer=_worker_init, initargs=(cfg.threads,))
    skipped: list[dict] = []
    est = {"s": 60.0}  # running estimate of one run's duration, for the deadline

    def execute(jobs: list[dict], desc: str) -> None:
        todo = []
        for j in jobs:
            f = cache / "runs" / f"{_job_key(cfg, j)}.json"
            if f.exists():
                done[_job_key(cfg, j)] = json.loads(f.read_text())
            else:
                todo.append(j)
        bar = tqdm(total=len(todo), desc=desc, dynamic_ncols=True)
        pending: dict = {}
        it = iter(todo)
        durations: list[float] = []

        def submit_next() -> bool:
            for j in it:
                if time.time() + est["s"] / max(cfg.workers, 1) > deadline:
                    skipped.append(j)
                    continue
                pending[pool.submit(run_one, cfg, j)] = (j, time.time())
                return True
            return False

        for _ in range(cfg.workers * 2):
            submit_next()
        while pending:
            fin, _ = cf.wait(list(pending), return_when=cf.FIRST_COMPLETED)
            for f in fin:
                j, t0 = pending.pop(f)
                try:
                    r = f.result()
                except Exception as e:  # a method that fails here is a finding, not a crash of the bench
                    r = {**j, "error": f"{type(e).__name__}: {str(e).splitlines()[0][:300]}"}
                    log(f"FAILED {j['method']} {j['label']} {j['task']} lr={j['lr']}: {r['error']}")
                durations.append(time.time() - t0)
                est["s"] = sorted(durations)[len(durations) // 2] if durations else est["s"]
                key = _job_key(cfg, j)
                done[key] = r
                write_json(cache / "runs" / f"{key}.json", r)
                bar.update(1)
                bar.set_postfix_str(f"{j['method']}/{j['label']}/{j['task']}")
                submit_next()
        bar.close()

    def job(m, p, task, lr, split):
        return {"method": m, "label": p["label"], "settings": p["settings"], "task": task, "lr": lr,
                "split": split}

    # 1. learning rate per method: default setting, selection split of LR_TASK
    lr_task = LR_TASK if LR_TASK in cfg.tasks else cfg.tasks[0]
    methods = [m for m in methods if points[m][0]["reachable"]]
    lr_jobs = [job(m, points[m][0], lr_task, lr, "select") for m in methods for lr in cfg.lrs]
    execute(lr_jobs, "LR selection")
    best_lr: dict[str, float] = {}
    lr_table: dict[str, dict] = {}
    for m in methods:
        rs = [done.get(_job_key(cfg, j)) for j in lr_jobs if j["method"] == m]
        rs = [r for r in rs if r and "error" not in r and not math.isnan(r["metric"])]
        lr_table[m] = {str(r["lr"]): r["metric"] for r in rs}
        if rs:
            best_lr[m] = max(rs, key=lambda r: (r["metric"], -r["lr"]))["lr"]
    log("chosen LR: " + ", ".join(f"{m}={v:g}" for m, v in best_lr.items()))

    # 2. defaults on every task, then 3. budget points
    # method-major order, so a time budget cuts whole rows rather than one task of every row
    main_jobs = [job(m, points[m][0], t, best_lr[m], "dev") for m in methods if m in best_lr for t in cfg.tasks]
    execute(main_jobs, "defaults")
    # task-major: a time budget cuts the later (costlier) budget task, not half of every method
    budget_jobs = [job(m, p, t, best_lr[m], "dev") for t in cfg.tasks if t in cfg.budget_tasks
                   for p_i in range(1, 1 + len(cfg.budgets))
                   for m in methods if m in best_lr and len(points[m]) > p_i and points[m][p_i]["reachable"]
                   for p in [points[m][p_i]]]
    execute(budget_jobs, "budgets")
    pool.shutdown()

    runs = [done[_job_key(cfg, j)] for j in main_jobs + budget_jobs if _job_key(cfg, j) in done]
    lr_runs = [done[_job_key(cfg, j)] for j in lr_jobs if _job_key(cfg, j) in done]
    result = {"config": dataclasses.asdict(cfg),
              "key": {"select": cfg.key("select"), "dev": {t: cfg.key("dev", t) for t in cfg.tasks}},
              "machine": _machine(), "points": points,
              "adapted": ADAPTED, "lr_runs": lr_runs,
              "lr_selection": lr_table, "best_lr": best_lr, "runs": runs,
              "skipped": [{k: j[k] for k in ("method", "label", "task")} for j in skipped],
              "unreachable": [{"method": m, **p} for m, ps in points.items() for p in ps if not p["reachable"]],
              "wall_s": time.time() - t_start, "log": logs}
    write_report(result, out)
    return result


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
            f.write_text(json.dumps(r))
            n += 1
    log(f"resumed {n} finished runs from {previous}")


def _machine() -> dict:
    import transformers

    import deltakit

    return {"platform": platform.platform(), "logical_cpus": os.cpu_count(), "torch": torch.__version__,
            "transformers": transformers.__version__, "deltakit": deltakit.__version__,
            "python": platform.python_version()}


# ----------------------------------------------------------------------------- report
def _cell(r: dict | None) -> str:
    if r is None:
        return "-"
    if "error" in r:
        return "error"
    if r.get("diverged"):
        return "diverged"
    return f"{100 * r['metric']:.1f}"


def rows_by_point(result: dict) -> dict[tuple[str, str], dict[str, dict]]:
    by: dict[tuple[str, str], dict[str, dict]] = {}
    for r in result["runs"]:
        by.setdefault((r["method"], r["label"]), {})[r["task"]] = r
    return by


def table(result: dict) -> str:
    tasks = result["config"]["tasks"]
    by = rows_by_point(result)
    full = by.get((FULL, "default"), {})
    head = ("| method | point | LR | trainable | % of base | stored KB | " + " | ".join(
        f"{t} ({TASK_METRIC[t]})" for t in tasks) + " | mean | vs full FT | train s (mean) |")
    lines = [head, "|" + "---|" * 3 + "---:|" * (3 + len(tasks) + 3)]
    order = sorted(by, key=lambda k: (k[0] != FULL, k[0], {"default": 0}.get(k[1], 1), k[1]))
    for m, label in order:
        rs = by[(m, label)]
        any_r = next(iter(rs.values()))
        ok = [rs[t] for t in tasks if t in rs and "error" not in rs[t] and not rs[t].get("diverged")]
        mean = sum(r["metric"] for r in ok) / len(ok) if len(ok) == len(tasks) else None
        both = [t for t in tasks if t in rs and rs[t] in ok and t in full and "error" not in full[t]]
        fsum = sum(full[t]["metric"] for t in both)
        rel = f"{sum(rs[t]['metric'] for t in both) / fsum:.2f}" if both and fsum > 0 else "-"
        tr = any_r.get("trainable")
        base = any_r.get("base_total") or 1
        lines.append(
            f"| {m} | {label} | {any_r['lr']:g} | {tr:,} | {100 * tr / base:.3f} | "
            f"{any_r.get('stored_bytes', 0) / 1024:.0f} | " + " | ".join(_cell(rs.get(t)) for t in tasks)
            + f" | {'-' if mean is None else f'{100 * mean:.1f}'} | {rel} | "
            f"{sum(r.get('train_s', 0) for r in ok) / max(len(ok), 1):.0f} |")
    return "\n".join(lines)


def plot(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    tasks = result["config"]["tasks"]
    by = rows_by_point(result)
    fig, axes = plt.subplots(1, len(tasks) + 1, figsize=(4.2 * (len(tasks) + 1), 4.6), squeeze=False)
    axes = axes[0]
    markers = {"default": "o", "0.1%": "v", "1%": "^"}
    cmap = plt.get_cmap("tab20")
    methods = sorted({m for m, _ in by})
    color = {m: cmap(i % 20) for i, m in enumerate(methods)}
    for ax, t in zip(axes, [*tasks, "mean"]):
        for (m, label), rs in by.items():
            if t == "mean":
                ok = [rs[x] for x in tasks if x in rs and "error" not in rs[x] and not rs[x].get("diverged")]
                if len(ok) != len(tasks):
                    continue
                y = sum(r["metric"] for r in ok) / len(ok)
                r0 = ok[0]
            else:
                r0 = rs.get(t)
                if r0 is None or "error" in r0 or r0.get("diverged"):
                    continue
                y = r0["metric"]
            x = max(r0["trainable"], 1)
            ax.scatter(x, y, color="black" if m == FULL else color[m], marker=markers.get(label, "s"),
                       s=36, zorder=3)
            if label == "default":
                ax.annotate(m, (x, y), fontsize=6, xytext=(2, 2), textcoords="offset points")
        ax.set_xscale("log")
        ax.set_xlabel("trainable parameters (head excluded, log)")
        ax.set_title(f"{t} ({TASK_METRIC.get(t, 'mean of tasks')})")
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("dev metric")
    handles = [plt.Line2D([], [], marker=mk, linestyle="", color="gray", label=lb) for lb, mk in markers.items()]
    axes[-1].legend(handles=handles, loc="lower right", fontsize=8)
    fig.suptitle("deltakit methods on MiniLM: dev metric vs trainable parameters "
                 "(o paper default, v ~0.1%, ^ ~1% of base)", fontsize=10)
    fig.tight_layout()
    tmp = path.with_suffix(".tmp.png")
    fig.savefig(tmp, dpi=130)
    os.replace(tmp, path)
    plt.close(fig)


def write_report(result: dict, out_dir: Path) -> None:
    from deltakit.io.files import atomic_write, write_json

    out_dir.mkdir(parents=True, exist_ok=True)
    write_json(out_dir / "methods.json", result)
    c = result["config"]
    proto = ", ".join(f"{t} {st} steps x {ml} tokens" + (f" over {nf} rows" if nf else "")
                      for t, st, ml, nf in c["task_protocol"] if t in c["tasks"])
    md = [f"# PEFT methods on MiniLM ({', '.join(c['tasks'])})", "",
          f"Batch {c['batch_size']}; per task: {proto}; bf16 autocast. LR per method from {list(c['lrs'])}, "
          f"chosen by a {c['select_steps']}-step probe scored on a held-out part of SST-2 train. Budget points "
          f"on {', '.join(c['budget_tasks'])}. {c['workers']} workers x {c['threads']} thread(s); "
          f"wall {result['wall_s'] / 60:.0f} min this invocation (cached runs not counted).",
          "", table(result), ""]
    if result["unreachable"]:
        md += ["Budgets a method's knob cannot reach within 1.5x: " + ", ".join(
            f"{u['method']} {u['label']} (closest {u.get('trainable')})" for u in result["unreachable"]), ""]
    if result["skipped"]:
        md += [f"Not run (time budget): {len(result['skipped'])} runs: " + ", ".join(
            f"{s['method']}/{s['label']}/{s['task']}" for s in result["skipped"]), ""]
    with atomic_write(out_dir / "methods.md", "w") as f:
        f.write("\n".join(md) + "\n")
    plot(result, out_dir / "methods.png")
    print("\n".join(md))


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
        out = Path(a.out_dir) if a.out_dir else HERE / "results"
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
