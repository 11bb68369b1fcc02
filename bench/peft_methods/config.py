"""The methods benchmark's configuration: each method's size knob, the task protocol, quick mode."""
from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass

from _common import DEFAULT_DATA, TASK_METRIC

DEFAULT_CACHE = os.environ.get("DELTAKIT_BENCH_CACHE", "/tmp/deltakit_bench_methods")
__all__ = ["Config", "QUICK", "KNOBS", "ADAPTED", "FULL", "LR_TASK", "DEFAULT_CACHE", "DEFAULT_DATA", "TASK_METRIC"]
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
    "corda": (lambda v: {"r": v, "alpha": 2.0 * v}, 1, 384, _INT),     # r <= min(out, in) = 384 on MiniLM
    "c_lora": (lambda v: {"r": v, "alpha": 2.0 * v}, 1, 512, _INT),
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
