"""Real tiny adapters for the library tests, and the worker functions spawned processes run
(module level, so that multiprocessing's spawn can import them)."""
from __future__ import annotations

import os
from pathlib import Path

import torch

import deltakit as dk


def lora_dir(out: Path, model, *, r: int, targets: list[str], seed: int, name: str | None = None,
             alpha: float | None = None) -> Path:
    """A LoRA with seeded random factors (a fresh LoRA has B = 0, no direction to route by)."""
    cfg = dk.LoraConfig(r=r, targets=targets, **({"alpha": alpha} if alpha is not None else {}))
    return adapter_dir(out, model, cfg, seed=seed, name=name)


def adapter_dir(out: Path, model, config, *, seed: int, name: str | None = None) -> Path:
    """Attach an adapter of any method, give every parameter of it seeded random values, save it
    to ``out`` and detach: ``model`` is left as it was."""
    name = name or out.name  # as 'deltakit train -o OUT' names it
    adapter = dk.attach(model, config, name=name)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, p in sorted(adapter.named_parameters()):
            p.copy_(torch.randn(p.shape, generator=g))
    dk.save_adapter(adapter, out)
    dk.detach(model, name)
    return out


def mlp() -> torch.nn.Module:
    """A plain torch base (no transformers import: spawned workers start in seconds)."""
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(12, 16), torch.nn.ReLU(), torch.nn.Linear(16, 8))


def add_worker(root: str, adapter_dirs: list[str], name: str) -> list[str]:
    """One concurrent writer: add every directory under ``name`` (auto versions)."""
    from deltakit.library import AdapterLibrary

    lib = AdapterLibrary(root)
    model = mlp()
    return [lib.add(d, model=model, name=name).ref for d in adapter_dirs]


def crashing_add(root: str, adapter_dir: str) -> None:
    """An add killed (os._exit: no cleanup, no rollback handler runs) after its files are
    published and before its index row is committed."""
    from deltakit.library import AdapterLibrary
    from deltakit.library._index import Index

    def die(*args, **kwargs):
        os._exit(17)

    Index.insert = staticmethod(die)
    AdapterLibrary(root).add(adapter_dir, model=mlp(), name="crashed")
