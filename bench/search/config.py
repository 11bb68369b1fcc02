"""The search benchmark's protocol: tasks, the methods benchmark's runs it is matched against,
the compute budget, and the search YAML (written as a user writes it, read by deltakit.search).

Compute is counted as **optimiser steps x batch size, summed over training runs** (training
examples processed). Per task the methods benchmark trains every method once at its default
(``methods_runs`` runs, full fine-tuning included) for the task's ``steps`` at batch 16: that is
the budget the search gets on that task (times ``--budget-scale``). A search trial costs the
steps it trained (a trial pruned at a rung of 22 steps costs 22 x 16). Not counted on either
side: the forward-only scoring (rungs on the held-out split; dev), the methods benchmark's LR
probe (one per method, on SST-2, shared by every task) and its budget points (SST-2 and MRPC
only), and the dev re-training of the front's configurations (reported separately).
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path

import yaml

from _common import DEFAULT_DATA, TASK_METRIC

__all__ = ["BenchConfig", "DEFAULT_CACHE", "methods_config", "search_doc", "budget_examples", "default_methods"]

DEFAULT_CACHE = os.environ.get("DELTAKIT_BENCH_SEARCH_CACHE", "/tmp/deltakit_bench_search")


@dataclass(frozen=True)
class BenchConfig:
    data_dir: str = DEFAULT_DATA
    # single-sentence tasks where fine-tuning is far above the majority class (sst2: 81.9 vs
    # 50.9 in methods.md; trec and subj: 6 and 2 classes, majority 27.6% and 50.6% of dev)
    tasks: tuple[str, ...] = ("sst2", "trec", "subj")
    budget_scale: float = 1.0
    # the methods benchmark's per-task protocol for tasks it does not run: SST-2's (200 steps
    # x 64 tokens, one pass over 3200 rows)
    steps: int = 200
    max_length: int = 64
    batch_size: int = 16
    holdout: float = 0.2          # of the search's rows: 3200 fit + 800 held out (never dev)
    lr: tuple[float, float] = (1e-4, 1e-2)
    eta: int = 3
    sampler: str = "tpe"
    seed: int = 0
    workers: int = 2
    threads: int = 1
    max_front: int = 12           # front points re-trained and scored on dev (spread in log params)
    budgets: tuple[float, ...] = (0.001, 0.01)
    window: float = 1.5           # "at ~b": trainable <= window x b x base (the methods bench's 1.5x)


def methods_config(cfg: BenchConfig):
    """The methods benchmark's Config with this task list: dev runs of a task it already runs keep
    their cache key (its protocol entry is unchanged), so its recorded default runs are reused."""
    from peft_methods.config import Config

    base = Config()
    known = {t for t, *_ in base.task_protocol}
    extra = tuple((t, cfg.steps, cfg.max_length, 0) for t in cfg.tasks if t not in known)
    return dataclasses.replace(base, data_dir=cfg.data_dir, tasks=cfg.tasks, task_protocol=base.task_protocol + extra,
                               batch_size=cfg.batch_size, workers=cfg.workers, threads=cfg.threads)


def default_methods() -> list[str]:
    """The methods benchmark's default sweep: full fine-tuning plus every registered method (the
    registered ``full`` is the modules_to_save helper, not a method of its own)."""
    import deltakit as dk
    from peft_methods.config import FULL

    return [FULL] + [n for n in dk.list_methods() if n not in ("full", FULL)]


def budget_examples(cfg: BenchConfig, steps: int, n_runs: int) -> int:
    """The search's compute on one task: the methods benchmark's default sweep there (``n_runs``
    runs of ``steps`` steps at ``batch_size``), times ``budget_scale``."""
    return int(round(n_runs * steps * cfg.batch_size * cfg.budget_scale))


def search_doc(cfg: BenchConfig, task: str, steps: int, max_length: int, n_fit: int) -> dict:
    """The search YAML for one task: deltakit.search's cross-method space (every registered PEFT
    method, its knobs from its config's declarations; ``unified`` with AutoPEFT's space), the
    learning rate searched, held-out metric + trainable parameters, MO-ASHA on steps (rungs at
    1/9 and 1/3 of the steps with eta 3). ``n_fit`` rows are trained on, as in the methods
    benchmark's runs, plus ``holdout`` of the rows held out for the metric."""
    import deltakit as dk
    from deltakit.search.spec import PRESETS

    from peft_methods.config import ADAPTED

    # a paper default MiniLM cannot take is fixed as the methods benchmark fixes it (VB-LoRA's
    # vector_length), else every trial of that method is refused
    methods = {n: dict(ADAPTED.get(n, {})) for n in dk.list_methods() if n != "full"}
    if "unified" in methods:
        methods["unified"] = yaml.safe_load(PRESETS["autopeft"])["methods"]["unified"]
    doc = {"task": {"model": "minilm", "train": str(Path(cfg.data_dir) / task), "holdout": cfg.holdout,
                    "max_rows": int(round(n_fit / (1 - cfg.holdout))), "max_length": max_length,
                    "batch_size": cfg.batch_size, "metric": TASK_METRIC[task]},
           "methods": methods, "training": {"lr": list(cfg.lr), "steps": steps, "warmup": 0.1},
           "objectives": ["metric", "params"], "sampler": cfg.sampler,
           "fidelity": {"min_steps": _first_rung(steps, cfg.eta), "eta": cfg.eta, "kind": "halving"},
           "seed": cfg.seed}
    key = hashlib.sha256(json.dumps(doc, sort_keys=True).encode()).hexdigest()[:10]
    return {"name": f"bench-{task}-{key}", **doc}


def _first_rung(steps: int, eta: int) -> int:
    """ceil(steps / eta^2): rungs at ~1/9 and ~1/3 of the steps and none after (200 steps: 23 and
    69; floor division gave 22, 66 and 198, a last rung that saves 1% of a trial)."""
    return max(1, -(-steps // eta ** 2))
