"""Merge quality on real tasks: every deltakit merge method on 4 GLUE tasks, full FT and LoRA.

The bundled MiniLM (all-MiniLM-L6-v2, 6 layers, hidden 384) is fine-tuned on four
GLUE tasks read from ``<data>/<task>/{train,dev}.tsv`` (default ``/work/shared/data/text``,
env ``DELTAKIT_GLUE_DIR`` or ``--data-dir``), each with its OWN 2-label head:

* **full FT**: every weight trains; the task vector is ``finetuned - base`` over the
  encoder (embeddings, 6 blocks, pooler; everything except ``classifier.*``), made with
  ``TaskVector.from_state_dicts``;
* **LoRA**: r=8, alpha=16 on ``query`` / ``value`` through ``deltakit.attach``, the head
  trained in full (``modules_to_save``); the task vector is
  ``TaskVector.from_adapter(adapter, include_full=False)`` (the 12 q/v ``dW``s).

Same seed, steps, batch size and schedule for every task; bf16 autocast (fp32 master
weights) in training and evaluation. The 4 encoder task vectors are merged with every
method of ``deltakit.merge.list_merges()`` that applies to 4 task vectors; each task is
then scored with the merged encoder and its own fine-tuned head.

Selection never touches dev: a seeded part of each task's TRAINING sample is held out
(the *selection split*); every method's main knob is swept on it, the setting with the
best mean normalised selection score is chosen, and dev is scored at the chosen setting
and at the method's default. Data-dependent methods get their statistics from the
training data: Fisher (per-example empirical diagonal Fisher of each fine-tuned model
on its own fit split, ``estimate_fisher``), RegMean (input Gram matrices of every
``nn.Linear`` of each fine-tuned model on its own fit split, ``collect_grams``),
AdaMerging (layer-wise coefficients by entropy minimisation on the UNLABELLED inputs of
the selection split; each step holds a batch of every task and sums their entropies, the
paper's objective; ``adamerging`` at its defaults, and its starting coefficient swept over
the paper's 0.3 and task arithmetic's chosen lam).

Rows of the result table:

* ``base (lam=0)``: the pre-trained encoder with each task's own fine-tuned head (the
  head from that kind of fine-tune) = any merge with every coefficient at 0; the floor
  a merge must beat;
* ``individual``: each task's own fine-tuned model (the denominator of the normalised score);
* one row per merge method. ``norm`` = mean over tasks of merged / individual (metric:
  accuracy for SST-2 and QNLI, F1 for MRPC, Matthews correlation for CoLA).

Fine-tuned task vectors, heads and statistics are cached under ``--cache-dir``
(default ``/tmp/deltakit_merge_quality``), keyed by the training configuration, so a
rerun only redoes the merging. Writes ``bench/results/merge_quality.{json,md,png}``
(``--quick``: tiny sizes, written under the cache directory instead).

    python bench/bench_merge_quality.py [--quick] [--data-dir DIR] [--budget-min 38]
    deltakit bench merge-quality [--quick]
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import time
from pathlib import Path

import torch

from _common import RESULTS, Log, load_avg, machine_info, timer
from merge_quality.config import (DEFAULT_CACHE, DEFAULT_DATA, NOT_APPLICABLE, QUICK, SWEEPS, TASK_METRIC,
                                  Config)
from merge_quality.data import load_tasks, majority_baseline
from merge_quality.finetune import finetune, pretrain
from merge_quality.report import refresh_previous, write_report
from merge_quality.sweep import run_kind

DEFINITIONS = {
    "selection_split": "n_select rows of each task's train sample, held out from fine-tuning; "
                       "all sweeps / choices use it; dev is only scored",
    "base": "pre-trained encoder + each task's own fine-tuned head (= merge with lam=0)",
    "individual": "each task's own fine-tuned encoder + head",
    "normalised": "mean over tasks of merged / individual dev score"}


def run(quick: bool = False, **overrides) -> dict:
    """Fine-tune (or read the cache), merge with every method, write the report; returns the result."""
    out_dir = Path(overrides.pop("out_dir", None) or (Path(DEFAULT_CACHE) / "quick" if quick else RESULTS))
    cache = Path(overrides.pop("cache_dir", None) or DEFAULT_CACHE)
    budget_min = overrides.pop("budget_min", None) or 38.0
    only = set(overrides.pop("methods", None) or ()) or None
    cfg = Config(**({**QUICK, **overrides} if quick else overrides))
    torch.set_num_threads(cfg.threads)
    torch.manual_seed(cfg.seed)
    log = Log()
    t_start = time.time()
    load_start = load_avg()
    log(f"merge-quality bench ({'quick' if quick else 'full'}): tasks {cfg.tasks}, {cfg.steps} steps x "
        f"{cfg.batch_size}, fit {cfg.n_fit} / select {cfg.n_select} / dev <= {cfg.n_dev} rows per task; "
        f"budget {budget_min} min; cache {cache}")
    from deltakit.io.models import load_classifier

    base_model, tok = load_classifier(cfg.model, 2, seed=cfg.seed)
    base_state = {k: v.detach().clone() for k, v in base_model.state_dict().items()}
    del base_model
    tasks = load_tasks(cfg, tok)
    result = _header(cfg, quick, tasks, load_start)
    log(f"data: {result['data']}")
    pretrain(cfg, cache, log)
    trained = _finetune_all(cfg, tasks, base_state, cache, log, result)
    for i, kind in enumerate(cfg.kinds):
        remaining = budget_min * 60 - (time.time() - t_start)
        deadline = time.time() + remaining / (len(cfg.kinds) - i)
        t_kind = timer()
        tvs, heads, info = trained.pop(kind)
        result["kinds"][kind] = {"train": info, **run_kind(cfg, kind, tasks, tok, base_state, tvs, heads, cache,
                                                            deadline, log, only=only)}
        del tvs, heads
        result["timings"][f"merge_{kind}_s"] = t_kind()
        result["machine"][f"load_after_{kind}"] = load_avg()
    result["timings"]["total_s"] = round(time.time() - t_start, 1)
    result["machine"]["load_end"] = load_avg()
    result["majority_baseline"] = majority_baseline(cfg)
    if only is not None:
        result = refresh_previous(result, out_dir / "merge_quality.json", only, log)
    write_report(result, out_dir)
    log(f"wrote {out_dir / 'merge_quality.json'}, .md, .png; total {result['timings']['total_s']:.0f}s")
    return result


def _header(cfg: Config, quick: bool, tasks, load_start: list[float]) -> dict:
    """The result before any figure: configuration, definitions, sweeps, machine, data sizes."""
    info = machine_info()
    machine = info | {"cpus": info["logical_cpus"], "threads": torch.get_num_threads(), "load_start": load_start}
    return {"benchmark": "merge_quality", "quick": quick, "config": dataclasses.asdict(cfg),
            "definitions": DEFINITIONS | {"metrics": {t: TASK_METRIC.get(t, "accuracy") for t in cfg.tasks}},
            "sweeps": {m: SWEEPS.get(m, []) for m in SWEEPS}, "not_run": dict(NOT_APPLICABLE),
            "machine": machine,
            "data": {t: {"fit": len(td.fit), "select": len(td.select), "dev": len(td.dev)} for t, td in tasks.items()},
            "kinds": {}, "timings": {}}


def _finetune_all(cfg: Config, tasks, base_state, cache: Path, log: Log, result: dict) -> dict:
    """All fine-tunes first, so the merge phases share what is left of the budget."""
    trained = {}
    for kind in cfg.kinds:
        elapsed = timer()
        tvs, heads, info = {}, {}, {}
        for t, td in tasks.items():
            tvs[t], heads[t], info[t] = finetune(cfg, kind, td, base_state, cache, log)
        trained[kind] = (tvs, heads, info)
        result["timings"][f"finetune_{kind}_s"] = elapsed()
        result["machine"][f"load_after_finetune_{kind}"] = load_avg()
    return trained


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="tiny sizes / few steps (smoke run; output under the cache)")
    p.add_argument("--data-dir", default=None, help=f"GLUE-style task folders (default {DEFAULT_DATA})")
    p.add_argument("--cache-dir", default=None, help=f"fine-tune / statistics cache (default {DEFAULT_CACHE})")
    p.add_argument("--out-dir", default=None, help="where merge_quality.{json,md,png} go (default bench/results)")
    p.add_argument("--tasks", default=None, help="comma-separated task names (default sst2,mrpc,cola,qnli)")
    p.add_argument("--kinds", default=None, help="comma-separated subset of full,lora (default both)")
    p.add_argument("--steps", type=int, default=None)
    p.add_argument("--n-fit", type=int, default=None)
    p.add_argument("--n-select", type=int, default=None)
    p.add_argument("--n-dev", type=int, default=None)
    p.add_argument("--report-from", default=None, metavar="JSON",
                   help="only rebuild the .md / .png next to this merge_quality.json (no training or merging)")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default 1)")
    p.add_argument("--no-bf16", action="store_true")
    p.add_argument("--no-sweep", action="store_true", help="default settings only")
    p.add_argument("--methods", default=None,
                   help="comma-separated: rerun only these merge methods (task arithmetic always runs) and put them "
                        "into the existing merge_quality.json, whose fine-tunes must be the cached ones")
    p.add_argument("--budget-min", type=float, default=None,
                   help="sweep points beyond this wall-clock budget are skipped and listed (default 38)")
    a = p.parse_args(argv)
    if a.report_from:
        path = Path(a.report_from)
        result = json.loads(path.read_text())
        if "majority_baseline" not in result:
            result["majority_baseline"] = majority_baseline(Config(**{
                k: tuple(v) if isinstance(v, list) else v for k, v in result["config"].items()}))
        write_report(result, path.parent)
        return 0
    over = {k: v for k, v in {"data_dir": a.data_dir, "steps": a.steps, "n_fit": a.n_fit, "n_select": a.n_select,
                              "n_dev": a.n_dev, "threads": a.threads, "cache_dir": a.cache_dir, "out_dir": a.out_dir,
                              "budget_min": a.budget_min}.items() if v is not None}
    if a.tasks:
        over["tasks"] = tuple(a.tasks.split(","))
    if a.kinds:
        over["kinds"] = tuple(a.kinds.split(","))
    if a.no_bf16:
        over["bf16"] = False
    if a.no_sweep:
        over["sweep"] = False
    if a.methods:
        from deltakit.merge import list_merges

        over["methods"] = a.methods.split(",")
        unknown = [m for m in over["methods"] if m not in {*list_merges(), "adamerging"}]
        if unknown:
            p.error(f"--methods: expected merge method names, found {unknown[0]!r}")
    run(quick=a.quick, **over)
    return 0


if __name__ == "__main__":
    sys.exit(main())
