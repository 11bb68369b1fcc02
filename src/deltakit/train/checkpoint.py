"""Training checkpoints without pickle: safetensors for tensors, JSON for the rest.

One checkpoint is one directory, written atomically (:func:`deltakit.io.files.atomic_dir`)::

    ckpt_dir/step-00000010/
        trainable.safetensors   trainable parameters, by name (nothing else of the model)
        optimizer.safetensors   optimiser state tensors, key "<param name>/<state key>"
        rng.safetensors         torch RNG state per rank, key "cpu/<rank>" and "cuda/<rank>"
        trainer_state.json      step, optimiser param groups and scalar state (by parameter
                                name), scheduler state, history, run config
        <key>.safetensors       optional extra tensors (``fit`` keeps the best parameters so
                                far as ``best`` when it stops early, and the tensors of its
                                i-th stateful callback as ``callback-<i>``; their JSON values
                                go in ``trainer_state.json``, see :func:`split_state`)
    ckpt_dir/run.json           optional: the settings of the run the directory belongs to
                                (:func:`claim_checkpoint_dir`), so another run cannot resume it

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

import json
import os
import re
import shutil
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from deltakit.io.files import DeltakitFileError, atomic_dir, read_json, write_json
from deltakit.io.tensors import load_tensors, save_tensors

__all__ = ["save_checkpoint", "load_checkpoint", "load_extra_tensors", "latest_checkpoint", "prune_checkpoints",
           "rng_state", "set_rng_state", "split_state", "default_checkpoint_dir", "claim_checkpoint_dir", "CHECKPOINT_FORMAT"]

CHECKPOINT_FORMAT = "deltakit.train.checkpoint/1"
_STEP_DIR = re.compile(r"^step-(\d+)$")
RUN_FILE = "run.json"  # the settings of the run a checkpoint directory belongs to


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


def split_state(state: Mapping[str, Any], where: str) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """(JSON values, CPU tensors) of a mixed ``state_dict()``, for ``trainer_state.json`` and
    a safetensors file: a value that is neither a tensor nor strict JSON (no NaN) is an
    error rather than pickled."""
    scalars: dict[str, Any] = {}
    tensors: dict[str, torch.Tensor] = {}
    for k, v in state.items():
        if not isinstance(k, str):
            raise ValueError(f"expected string keys in {where}, found {k!r}")
        if isinstance(v, torch.Tensor):
            tensors[k] = v.detach().cpu()
            continue
        try:
            json.dumps(v, allow_nan=False)
        except (TypeError, ValueError) as e:
            raise ValueError(f"expected a tensor or a JSON value at {where}[{k!r}], found {type(v).__name__} "
                             f"({e})") from None
        scalars[k] = v
    return scalars, tensors


def _optimizer_state(optimizer: torch.optim.Optimizer, params: dict[str, torch.nn.Parameter]
                     ) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """(JSON part, tensors keyed ``"<param name>/<state key>"``) of an optimiser's state."""
    names = _param_names(optimizer, params)
    sd = optimizer.state_dict()
    tensors: dict[str, torch.Tensor] = {}
    scalars: dict[str, dict[str, Any]] = {}
    for idx, st in sd["state"].items():
        for key, v in st.items():
            if isinstance(v, torch.Tensor):
                tensors[f"{names[idx]}/{key}"] = v
            else:
                scalars.setdefault(names[idx], {})[key] = _json_value(v, f"optimizer state {key}")
    groups = [{k: (_json_value(v, f"param_groups.{k}") if k != "params" else [names[i] for i in v])
               for k, v in g.items()} for g in sd["param_groups"]]
    return {"class": type(optimizer).__name__, "param_groups": groups, "scalars": scalars}, tensors


def save_checkpoint(ckpt_dir: str | os.PathLike, params: dict[str, torch.nn.Parameter],
                    optimizer: torch.optim.Optimizer | None = None,
                    scheduler: torch.optim.lr_scheduler.LRScheduler | None = None, *, step: int,
                    rng: dict[str, torch.Tensor] | None = None, extra: dict[str, Any] | None = None,
                    extra_tensors: Mapping[str, Mapping[str, torch.Tensor]] | None = None) -> Path:
    """Write ``ckpt_dir/step-<step>/`` atomically and return its path.

    ``rng`` maps ``"cpu/<rank>"`` (and ``"cuda/<rank>"``) to RNG state tensors; default:
    this process's state as rank 0. ``extra`` is stored in ``trainer_state.json``;
    ``extra_tensors`` ``{key: {name: tensor}}`` as ``<key>.safetensors`` (read back with
    :func:`load_extra_tensors`), e.g. the best parameters so far for early stopping.
    """
    path = Path(ckpt_dir) / f"step-{step:08d}"
    extra_tensors = dict(extra_tensors or {})
    if bad := sorted(k for k in extra_tensors if k in ("trainable", "optimizer", "rng") or "/" in k):
        raise ValueError(f"expected extra_tensors keys other than trainable / optimizer / rng and without '/', "
                         f"found {bad}")
    state: dict[str, Any] = {"format": CHECKPOINT_FORMAT, "step": step, "extra": extra or {},
                             "extra_tensors": sorted(extra_tensors)}
    opt_tensors: dict[str, torch.Tensor] = {}
    if optimizer is not None:
        state["optimizer"], opt_tensors = _optimizer_state(optimizer, params)
    if scheduler is not None:
        sd = {k: _json_value(v, f"scheduler.{k}") for k, v in scheduler.state_dict().items() if k != "lr_lambdas"}
        state["scheduler"] = {"class": type(scheduler).__name__, "state": sd}
    if rng is None:
        rng = {f"{k}/0": v for k, v in rng_state().items()}
    with atomic_dir(path) as tmp:
        save_tensors(tmp / "trainable.safetensors", {n: p.detach() for n, p in params.items()})
        save_tensors(tmp / "optimizer.safetensors", opt_tensors)
        save_tensors(tmp / "rng.safetensors", rng)
        for key, tensors in extra_tensors.items():
            save_tensors(tmp / f"{key}.safetensors", tensors)
        write_json(tmp / "trainer_state.json", state)
    return path


def load_extra_tensors(path: str | os.PathLike, key: str,
                       device: str | torch.device = "cpu") -> dict[str, torch.Tensor]:
    """The ``extra_tensors[key]`` a checkpoint was saved with."""
    path = Path(path)
    if key not in read_json(path / "trainer_state.json").get("extra_tensors", []):
        raise DeltakitFileError(f"expected extra tensors {key!r} in the checkpoint {path}, found none")
    return load_tensors(path / f"{key}.safetensors", device=device)


def _check_params(path: Path, tensors: dict[str, torch.Tensor], params: dict[str, torch.nn.Parameter]) -> None:
    if set(tensors) != set(params):
        missing, unexpected = sorted(set(params) - set(tensors)), sorted(set(tensors) - set(params))
        raise DeltakitFileError(f"expected the checkpoint {path} to hold the model's {len(params)} trainable "
                                f"parameters, found missing={missing[:5]} unexpected={unexpected[:5]}")
    for n, p in params.items():
        if tensors[n].shape != p.shape:
            raise DeltakitFileError(f"expected {n} of shape {tuple(p.shape)} in {path}, "
                                    f"found {tuple(tensors[n].shape)}")


def _load_optimizer(path: Path, state: dict[str, Any], optimizer: torch.optim.Optimizer,
                    params: dict[str, torch.nn.Parameter]) -> None:
    if "optimizer" not in state:
        raise DeltakitFileError(f"expected optimizer state in {path}, found none")
    index = {n: i for i, n in enumerate(_param_names(optimizer, params))}
    opt_state: dict[int, dict[str, Any]] = {}
    for key, v in load_tensors(path / "optimizer.safetensors").items():
        name, _, sub = key.rpartition("/")
        if name not in index:
            raise DeltakitFileError(f"expected optimizer state only for trainable parameters in {path}, "
                                    f"found state for {name!r}")
        opt_state.setdefault(index[name], {})[sub] = v
    for name, scal in state["optimizer"]["scalars"].items():
        opt_state.setdefault(index[name], {}).update(scal)
    groups = [{**g, "params": [index[n] for n in g["params"]]} for g in state["optimizer"]["param_groups"]]
    optimizer.load_state_dict({"state": opt_state, "param_groups": groups})


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
    tensors = load_tensors(path / "trainable.safetensors", device=next(iter(params.values())).device)
    _check_params(path, tensors, params)  # everything is checked before the model is touched
    if optimizer is not None:
        _load_optimizer(path, state, optimizer, params)
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


def _is_temp(name: str) -> bool:
    """Left by an atomic write that was killed (``.NAME.XXXX.tmp``): not a file of anyone's."""
    return name.startswith(".") and name.endswith(".tmp")


def default_checkpoint_dir(out: str | os.PathLike) -> Path:
    """Where ``deltakit train -o OUT`` checkpoints when no ``--ckpt-dir`` is given: ``OUT.ckpt``
    beside ``OUT`` (visible, not hidden: it can hold a few hundred MB while a run is going)."""
    out = Path(os.path.abspath(out))
    if not out.name:
        raise ValueError(f"expected an output directory with a name, found {out}")
    return out.with_name(out.name + ".ckpt")


def claim_checkpoint_dir(ckpt_dir: str | os.PathLike, run: Mapping[str, Any]) -> Path | None:
    """Bind ``ckpt_dir`` to one run (``run``: the settings that decide its result) before training.

    A new or empty directory (or one whose run never wrote a checkpoint) records ``run`` in
    ``run.json``; one already bound to the same ``run`` is a resume and returns its newest
    checkpoint. A directory with checkpoints of other settings, or holding files that are
    not ours, is refused (one line naming the first differences): resuming it would
    silently mix two runs.
    """
    ckpt_dir = Path(ckpt_dir)
    run = json.loads(json.dumps(run))  # the JSON form, as it will be compared after a restart
    saved_file = ckpt_dir / RUN_FILE
    if saved_file.is_file() and latest_checkpoint(ckpt_dir) is None:
        saved_file.unlink()  # bound to a run that never checkpointed: nothing to lose, bind it anew
    if saved_file.is_file():
        saved = read_json(saved_file)
        diff = {k: (saved.get(k), run.get(k)) for k in sorted(set(saved) | set(run)) if saved.get(k) != run.get(k)}
        if diff:
            shown = ", ".join(f"{k}: {a!r} then, {b!r} now" for k, (a, b) in list(diff.items())[:3])
            raise ValueError(f"expected the checkpoints in {ckpt_dir} to be from this run, found another run's "
                             f"({shown}); delete {ckpt_dir} to start over")
        return latest_checkpoint(ckpt_dir)
    others = sorted(p.name for p in ckpt_dir.iterdir() if not _is_temp(p.name)) if ckpt_dir.is_dir() else []
    if others:
        raise ValueError(f"expected {ckpt_dir} to be empty or a deltakit checkpoint directory, found {others[:5]}")
    ckpt_dir.mkdir(parents=True, exist_ok=True)
    write_json(saved_file, run)
    return None
