"""The benchmark's world: SmolLM2, a library of its per-task LoRAs (all attached, none active),
and each task's dev subsample and a few train rows (LoraHub's shots, retrieval's examples)."""
from __future__ import annotations

import contextlib
import shutil
from dataclasses import dataclass, field
from pathlib import Path

import torch

from _common import DEFAULT_DATA, HERE, Log

from .config import Config

__all__ = ["World", "build", "merged_into_base"]


@dataclass
class World:
    model: object
    tok: object
    lib: object
    refs: dict[str, str]                      # task -> library ref; the adapter is attached as the task's name
    dev: dict[str, list] = field(default_factory=dict)
    train: dict[str, list] = field(default_factory=dict)
    zero_shot: dict[str, float] = field(default_factory=dict)   # as recorded by llm_tasks (for the report)

    @property
    def names(self) -> tuple[str, ...]:
        return tuple(self.refs)


def _description(task: str) -> str:
    from deltakit.train.instruct import TASKS
    return TASKS[task].template.split("\n")[0]


def build(cfg: Config, log: Log) -> World:
    """A fresh library from ``cfg.adapters`` (rebuilt each run: the benchmark owns it), every
    adapter attached to one SmolLM2 under its task's name."""
    import deltakit as dk
    from deltakit.io.models import load_causal_lm
    from deltakit.library import AdapterLibrary
    from deltakit.train.instruct import read_task_file

    src = HERE.parent / cfg.adapters
    missing = [t for t in cfg.tasks if not (src / t / "adapter.json").is_file()]
    if missing:
        raise SystemExit(f"no adapters for {missing} under {src}: run `python bench/llm_tasks.py` first")
    model, tok = load_causal_lm("smollm2")
    model.eval()
    root = HERE.parent / cfg.library
    if root.exists():
        shutil.rmtree(root)
    lib = AdapterLibrary(root)
    refs = {}
    for t in cfg.tasks:
        e = lib.add(src / t, model=model, name=t, task=t, description=_description(t), groups=["bench"])
        refs[t] = e.ref
        lib.load(model, e.ref, name=t)
    dk.set_active(model, [])
    world = World(model, tok, lib, refs)
    for t in cfg.tasks:
        world.dev[t] = read_task_file(Path(DEFAULT_DATA) / t / "dev.tsv", t, max_rows=cfg.n_dev, seed=cfg.seed)
        shots = max(max(cfg.lorahub_shots), cfg.retrieval_examples)
        world.train[t] = read_task_file(Path(DEFAULT_DATA) / t / "train.tsv", t, max_rows=shots, seed=cfg.seed + 1)
    log(f"library of {len(refs)} adapters at {root}; {sum(map(len, world.dev.values()))} dev rows")
    return world


@contextlib.contextmanager
def merged_into_base(model, tv):
    """Within the block the base weights carry the merged ``dW`` of task vector ``tv`` and no
    adapter applies; the original weights are restored afterwards (exactly: saved copies)."""
    import deltakit as dk

    saved = {}
    try:
        with torch.no_grad():
            for n in tv.keys():
                p = model.get_submodule(n.rsplit(".", 1)[0]).base.get_parameter(n.rsplit(".", 1)[1])
                saved[n] = (p, p.detach().clone())
                p.add_(tv.dense(n, torch.float32).to(p.dtype))
        with dk.disabled(model):
            yield
    finally:
        with torch.no_grad():
            for p, orig in saved.values():
                p.copy_(orig)
