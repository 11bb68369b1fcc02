"""Training checkpoints without pickle: safetensors for tensors, JSON for the rest.

One checkpoint is one directory, written atomically (:func:`deltakit.io.files.atomic_dir`)::

    ckpt_dir/step-00000010/
        trainable.safetensors   trainable parameters, by name (nothing else of the model)
        optimizer.safetensors   optimiser state tensors, key "<param name>/<state key>"
        rng.safetensors         torch RNG state per rank, key "cpu/<rank>" and "cuda/<rank>"
        trainer_state.json      step, optimiser param groups and scalar state (by parameter
                                name), scheduler state, history, run config

Optimiser state is keyed by parameter *name*, not position, so a checkpoint loads into
a freshly built model + optimiser and a mismatch is reported by name.

Example:
    >>> import tempfile, torch
    >>> from deltakit.train.checkpoint import save_checkpoint, load_checkpoint, latest_checkpoint
    >>> m = torch.nn.Linear(2, 1); opt = torch.optim.AdamW(m.parameters())
    >>> m(torch.ones(1, 2)).sum().backward(); opt.step()
    >>> d = tempfile.mkdtemp()
    >>> path = save_checkpoint(d, dict(m.named_parameters()), opt, step=1)
    >>> load_checkpoint(latest_checkpoint(d), dict(m.named_parameters()), opt)["step"]
    1
"""
from __future__ import annotations

import os
import re
import shutil
from pathlib import Path
from typing import Any

import torch

from deltakit.io.files import DeltakitFileError, atomic_dir, read_json, write_json
from deltakit.io.tensors import load_tensors, save_tensors

__all__ = ["save_checkpoint", "load_checkpoint", "latest_checkpoint", "prune_checkpoints",
           "rng_state", "set_rng_state", "CHECKPOINT_FORMAT"]

CHECKPOINT_FORMAT = "deltakit.train.checkpoint/1"
_STEP_DIR = re.compile(r"^step-(\d+)$")


def _step_dirs(ckpt_dir: Path) -> list[tuple[int, Path]]:
    if not ckpt_dir.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in ckpt_dir.iterdir()
             if (m := _STEP_DIR.match(p.name)) and (p / "trainer_state.json").is_file()]
    return sorted(found)


def latest_checkpoint(ckpt_dir: str | os.PathLike) -> Path | None:
    """The complete ``step-N`` directory with the largest N, or None."""
    dirs = _step_dirs(Path(ckpt_dir))
    return dirs[-1][1] if dirs else None


def prune_checkpoints(ckpt_dir: str | os.PathLike, keep_last: int) -> None:
    """Delete all but the newest ``keep_last`` ``step-N`` directories (``keep_last <= 0`` keeps all)."""
    if keep_last <= 0:
        return
    for _, p in _step_dirs(Path(ckpt_dir))[:-keep_last]:
        shutil.rmtree(p, ignore_errors=True)


def rng_state() -> dict[str, torch.Tensor]:
    """This process's torch RNG state as uint8 tensors (CPU, and current CUDA device if any)."""
    out = {"cpu": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        out["cuda"] = torch.cuda.get_rng_state()
    return out


def set_rng_state(state: dict[str, torch.Tensor]) -> None:
    torch.set_rng_state(state["cpu"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


def _param_names(optimizer: torch.optim.Optimizer, params: dict[str, torch.nn.Parameter]) -> list[str]:
    """Names of the optimiser's parameters in ``state_dict()`` index order."""
    name_of = {id(p): n for n, p in params.items()}
    names = []
    for group in optimizer.param_groups:
        for p in group["params"]:
            if id(p) not in name_of:
                raise ValueError(f"expected every optimised parameter to be among the {len(params)} "
                                 f"named trainable parameters, found one of shape {tuple(p.shape)} that is not")
            names.append(name_of[id(p)])
    return names


def _json_value(v: Any, where: str) -> Any:
    if isinstance(v, tuple):
        return list(v)
    if v is None or isinstance(v, (bool, int, float, str, list, dict)):
        return v
    raise ValueError(f"expected a JSON-serialisable value at {where}, found {type(v).__name__}")


def save_checkpoint(ckpt_dir: str | os.PathLike, params: dict[str, torch.nn.Parameter],
                    optimizer: torch.optim.Optimizer | None = None,
                    scheduler: torch.optim.lr_scheduler.LRScheduler | None = None, *, step: int,
                    rng: dict[str, torch.Tensor] | None = None, extra: dict[str, Any] | None = None) -> Path:
    """Write ``ckpt_dir/step-<step>/`` atomically and return its path.

    ``rng`` maps ``"cpu/<rank>"`` (and ``"cuda/<rank>"``) to RNG state tensors; default:
    this process's state as rank 0. ``extra`` is stored in ``trainer_state.json``.
    """
    path = Path(ckpt_dir) / f"step-{step:08d}"
    state: dict[str, Any] = {"format": CHECKPOINT_FORMAT, "step": step, "extra": extra or {}}
    opt_tensors: dict[str, torch.Tensor] = {}
    if optimizer is not None:
        names = _param_names(optimizer, params)
        sd = optimizer.state_dict()
        scalars: dict[str, dict[str, Any]] = {}
        for idx, st in sd["state"].items():
            for key, v in st.items():
                if isinstance(v, torch.Tensor):
                    opt_tensors[f"{names[idx]}/{key}"] = v
                else:
                    scalars.setdefault(names[idx], {})[key] = _json_value(v, f"optimizer state {key}")
        groups = [{k: (_json_value(v, f"param_groups.{k}") if k != "params" else [names[i] for i in v])
                   for k, v in g.items()} for g in sd["param_groups"]]
        state["optimizer"] = {"class": type(optimizer).__name__, "param_groups": groups, "scalars": scalars}
    if scheduler is not None:
        sd = {k: _json_value(v, f"scheduler.{k}") for k, v in scheduler.state_dict().items() if k != "lr_lambdas"}
        state["scheduler"] = {"class": type(scheduler).__name__, "state": sd}
    if rng is None:
        rng = {f"{k}/0": v for k, v in rng_state().items()}
    with atomic_dir(path) as tmp:
        save_tensors(tmp / "trainable.safetensors", {n: p.detach() for n, p in params.items()})
        save_tensors(tmp / "optimizer.safetensors", opt_tensors)
        save_tensors(tmp / "rng.safetensors", rng)
        write_json(tmp / "trainer_state.json", state)
    return path


def load_checkpoint(path: str | os.PathLike, params: dict[str, torch.nn.Parameter],
                    optimizer: torch.optim.Optimizer | None = None,
                    scheduler: torch.optim.lr_scheduler.LRScheduler | None = None, *,
                    rank: int = 0, restore_rng: bool = True) -> dict[str, Any]:
    """Load a ``step-N`` directory into ``params`` (in place), optimiser and scheduler.

    Restores this rank's RNG state when present. Returns the ``trainer_state.json`` dict.
    """
    path = Path(path)
    state = read_json(path / "trainer_state.json")
    if state.get("format") != CHECKPOINT_FORMAT:
        raise DeltakitFileError(f"expected format {CHECKPOINT_FORMAT!r} in {path / 'trainer_state.json'}, "
                                f"found {state.get('format')!r}")
    device = next(iter(params.values())).device
    tensors = load_tensors(path / "trainable.safetensors", device=device)
    if set(tensors) != set(params):
        missing, unexpected = sorted(set(params) - set(tensors)), sorted(set(tensors) - set(params))
        raise DeltakitFileError(f"expected the checkpoint {path} to hold the model's {len(params)} trainable "
                                f"parameters, found missing={missing[:5]} unexpected={unexpected[:5]}")
    for n, p in params.items():  # check everything before touching the model
        if tensors[n].shape != p.shape:
            raise DeltakitFileError(f"expected {n} of shape {tuple(p.shape)} in {path}, "
                                    f"found {tuple(tensors[n].shape)}")
    if optimizer is not None:
        if "optimizer" not in state:
            raise DeltakitFileError(f"expected optimizer state in {path}, found none")
        names = _param_names(optimizer, params)
        index = {n: i for i, n in enumerate(names)}
        flat = load_tensors(path / "optimizer.safetensors")
        opt_state: dict[int, dict[str, Any]] = {}
        for key, v in flat.items():
            name, _, sub = key.rpartition("/")
            if name not in index:
                raise DeltakitFileError(f"expected optimizer state only for trainable parameters in {path}, "
                                        f"found state for {name!r}")
            opt_state.setdefault(index[name], {})[sub] = v
        for name, scal in state["optimizer"]["scalars"].items():
            opt_state.setdefault(index[name], {}).update(scal)
        groups = [{**g, "params": [index[n] for n in g["params"]]} for g in state["optimizer"]["param_groups"]]
        optimizer.load_state_dict({"state": opt_state, "param_groups": groups})
    if scheduler is not None:
        sd = dict(state["scheduler"]["state"])
        if hasattr(scheduler, "lr_lambdas"):
            sd["lr_lambdas"] = [None] * len(scheduler.lr_lambdas)
        scheduler.load_state_dict(sd)
    with torch.no_grad():  # last, so a bad optimiser / scheduler part leaves the model untouched
        for n, p in params.items():
            p.copy_(tensors[n])
    if restore_rng:
        rng = load_tensors(path / "rng.safetensors")
        mine = {k.split("/")[0]: v for k, v in rng.items() if k.endswith(f"/{rank}")}
        if "cpu" in mine:
            set_rng_state(mine)
    return state
