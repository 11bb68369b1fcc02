"""The merge-quality benchmark's configuration: tasks, training sizes, each method's sweep."""
from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass

from _common import DEFAULT_DATA, TASK_METRIC

DEFAULT_CACHE = os.environ.get("DELTAKIT_BENCH_CACHE", "/tmp/deltakit_merge_quality")
KINDS = ("full", "lora")
HEAD_PREFIX = "classifier."
__all__ = ["Config", "QUICK", "SWEEPS", "NOT_APPLICABLE", "DATA_METHODS", "KINDS", "HEAD_PREFIX", "DEFAULT_CACHE",
           "DEFAULT_DATA", "TASK_METRIC"]

# Sweeps of each method's main knob(s): extra points besides the default setting (always run
# first); chosen on the selection split by mean normalised score. 3-4 points per method in all.
_DL = lambda *pairs: [{"density": d, "lam": l} for d, l in pairs]  # noqa: E731
SWEEPS: dict[str, list[dict]] = {
    "task_arithmetic": [{"lam": v} for v in (0.3, 0.5, 0.7)],           # default lam=1.0
    "ties": _DL((0.1, 1.0), (0.5, 1.0), (0.2, 1.5)),                    # default 0.2 / 1.0, disjoint mean
    "dare_ties": _DL((0.1, 0.5), (0.1, 0.3), (0.3, 0.5)),               # default 0.1 / 1.0, sums like TA
    "dare_linear": _DL((0.1, 0.5), (0.1, 0.3), (0.3, 0.5)),
    "darex_q": [{"q": v} for v in (0.3, 0.5, 1.0)],                     # default q=0.2 at density 0.1
    "breadcrumbs": _DL((0.9, 0.5), (0.9, 0.3), (0.7, 0.5)),             # default 0.9 / 1.0
    "breadcrumbs_ties": _DL((0.9, 0.5), (0.9, 0.3), (0.7, 0.5)),
    "della": _DL((0.3, 1.0), (0.7, 1.0), (0.5, 1.5)),                   # default 0.5 / 1.0, normalised
    "della_linear": _DL((0.5, 0.5), (0.5, 0.3), (0.3, 0.5)),            # default 0.5 / 1.0
    "cabs": [{"n": 1, "m": m, "weights": (l,) * 4} for m, l in ((4, 1.5), (8, 1.5), (8, 2.0))],  # default 1:4, 1.0
    "pcb": [{"ratio": r, "lam": l} for r, l in ((0.05, 1.0), (0.2, 1.0), (0.1, 1.5))],  # default 0.1 / 1.0
    "model_stock": [{"filter_wise": True}],
    "opcm": [{"alpha": v} for v in (0.3, 0.7)],
    "regmean": [{"alpha": v} for v in (0.5, 0.7)],                      # default 0.9
    "linear": [],        # no knob besides per-model weights (= task arithmetic with lam = 1/K)
    "multislerp": [],
    "fisher": [],
}
NOT_APPLICABLE = {
    "slerp": "interpolates the base with exactly ONE model (raises for K=4); pairwise only",
    "graft": "needs each task's graft learned on its data (deltakit.merge.localize_skill); not computed here yet",
    "lcsc": "combines checkpoints of ONE training run (searched with lcsc_search); at its default it is 'linear'",
    "resta": "safety re-alignment: [fine-tune, unsafe fine-tune] of one aligned base, not a K=4 multi-task merge",
}
DATA_METHODS = {"fisher": "fisher", "regmean": "gram"}  # method -> statistic it reads from ctx.stats


@dataclass(frozen=True)
class Config:
    tasks: tuple[str, ...] = ("sst2", "mrpc", "cola", "qnli")
    data_dir: str = DEFAULT_DATA
    model: str = "minilm"
    n_fit: int = 2000            # training rows per task (seeded sample of train.tsv)
    n_select: int = 150          # further train rows per task held out as the selection split
    n_dev: int | None = 400      # dev rows per task (seeded sample; None = all)
    steps: int = 400             # optimiser steps per fine-tune (every task, both kinds); 100 left
                                 # CoLA at MCC 0 and QNLI near chance: nothing for a merge to keep
    batch_size: int = 16
    max_length: int = 128
    lr_full: float = 1e-4
    lr_lora: float = 2e-3
    r: int = 8
    alpha: float = 16.0
    warmup_frac: float = 0.1
    weight_decay: float = 0.0
    bf16: bool = True
    seed: int = 0
    eval_batch: int = 128
    fisher_rows: int = 48        # examples (batches of one) for each model's diagonal Fisher
    gram_rows: int = 128         # examples for each model's RegMean Gram matrices
    adamerging_steps: int = 500  # deltakit.merge.adamerging default (the paper's)
    adamerging_init: float = 0.3  # where every coefficient starts (the paper's; the library default)
    adamerging_batch: int = 4    # rows per task per step (x 4 tasks = 16 rows a step)
    sweep: bool = True
    max_sweep_points: int | None = None  # quick mode: cap the points per method
    kinds: tuple[str, ...] = KINDS
    # 1 thread: on this shared 2-core VM, 2 OpenMP threads under load made a training step ~8x
    # slower than 1 thread (spinning barriers); 1 thread is also what a busy machine can give.
    threads: int = 1
    workers: int = 2             # processes for the fine-tunes (each with ``threads`` threads)
    quick: bool = False
    # merging shares one model and swaps heads, so every task needs the same head shape;
    # benchmarks that score each task on its own model (compression) lift this
    binary_only: bool = True

    def train_key(self, kind: str, task: str) -> str:
        keys = ("data_dir", "model", "n_fit", "n_select", "steps", "batch_size", "max_length", "lr_full",
                "lr_lora", "r", "alpha", "warmup_frac", "weight_decay", "bf16", "seed")
        blob = json.dumps({k: getattr(self, k) for k in keys} | {"kind": kind, "task": task}, sort_keys=True)
        return f"{kind}_{task}_{hashlib.sha256(blob.encode()).hexdigest()[:12]}"


QUICK = dict(n_fit=48, n_select=24, n_dev=32, steps=4, batch_size=8, fisher_rows=4, gram_rows=8,
             adamerging_steps=3, max_sweep_points=1, quick=True)
