"""Adapter directories: ``adapter.safetensors`` + ``adapter.json`` (the manifest).

The manifest records the method, its config, the targets (with the method used at
each: ``full`` for modules_to_save), the deltakit version, a fingerprint of the base
tensors the adapter was trained on, and the sha256 of the tensor file. Loading
checks all of it and builds the deltas off the model before inserting anything,
so a failed load leaves the model unchanged.
"""
from __future__ import annotations

import os
from pathlib import Path

from torch import nn

from .._version import __version__
from ..core.adapter import Adapter, adapters
from ..core.fingerprint import fingerprint_matches, model_fingerprint
from ..core.layer import DeltaLayer
from ..core.load import AdapterLoadError, attach_state
from ..core.registry import ConfigError, get_method
from .files import DeltakitFileError, atomic_dir, read_json, recover, sha256_file, write_json
from .tensors import load_tensors, save_tensors

__all__ = ["save_adapter", "load_adapter", "read_manifest", "AdapterLoadError", "MANIFEST", "TENSORS"]

MANIFEST = "adapter.json"
TENSORS = "adapter.safetensors"
FORMAT = "deltakit.adapter"
FORMAT_VERSION = 2  # 2: the base fingerprint covers the whole base (core/fingerprint.py)
_REQUIRED = {"method": str, "config": dict, "targets": dict, "tensors": dict, "base_fingerprint": str}


def save_adapter(adapter: Adapter, path: str | os.PathLike, *, training: dict | None = None,
                 full_fingerprint: bool = False) -> Path:
    """Write ``adapter`` as one directory, atomically (temp dir + rename).

    ``training``: what made it (JSON-able), stored as the manifest's ``training`` entry:
    ``{"steps": int, "metrics": {name: float}, "data": [{"split", "path", "sha256", "rows"}],
    "settings": {...}}`` as :func:`deltakit.train` callers write it; ``deltakit inspect`` shows it.
    ``full_fingerprint``: hash every byte of the base instead of a strided sample per tensor
    (slower on big models; see :mod:`deltakit.core.fingerprint`).
    """
    path = Path(path)
    state = adapter.state_dict()
    targets = {}
    for p, m in adapter.targets.items():
        base = adapter.model.get_submodule(p)
        base = base.base if isinstance(base, DeltaLayer) else base
        targets[p] = {
            "method": m,
            "type": type(base).__name__,
            "shapes": {k: list(v.shape) for k, v in base.named_parameters(recurse=False)},
        }
    with atomic_dir(path, kind="adapter") as tmp:
        save_tensors(tmp / TENSORS, state, metadata={"format": FORMAT})
        write_json(tmp / MANIFEST, {
            "format": FORMAT,
            "format_version": FORMAT_VERSION,
            "deltakit_version": __version__,
            "name": adapter.name,
            "method": adapter.spec.name,
            "kind": adapter.spec.kind,
            "config": adapter.config.to_dict(),
            "targets": targets,
            "base_fingerprint": model_fingerprint(adapter.model, exclude=_full_targets(adapter),
                                                  full=full_fingerprint),
            "tensors": {"file": TENSORS, "sha256": sha256_file(tmp / TENSORS),
                        "bytes": (tmp / TENSORS).stat().st_size, "count": len(state)},
            "base_model": _base_model_info(adapter.model),
            "parameters": {"total": adapter.num_parameters(),
                           "trainable": adapter.num_parameters(trainable_only=True)},
            **({"training": training} if training is not None else {}),
        })
    return path


def _full_targets(adapter: Adapter) -> list[str]:
    """modules_to_save: the adapter replaces them outright, so the base's copies do not count."""
    return [p for p, m in adapter.targets.items() if m == "full"]


def _base_model_info(model: nn.Module) -> dict:
    """Enough to rebuild the base for ``deltakit export``: its path/hub id, class, architecture
    and head size."""
    cfg = getattr(model, "config", None)
    return {"name_or_path": getattr(cfg, "_name_or_path", None) or None,
            "class": type(model).__name__,
            "model_type": getattr(cfg, "model_type", None),
            "num_labels": getattr(cfg, "num_labels", None)}


def read_manifest(path: str | os.PathLike) -> dict:
    path = Path(path)
    recover(path)  # a save killed between its two renames (no renameat2) left the old one aside
    if not path.is_dir():
        raise DeltakitFileError(f"expected an adapter directory at {path}, found {'a file' if path.exists() else 'nothing'}")
    man = read_json(path / MANIFEST)
    if man.get("format") != FORMAT:
        raise DeltakitFileError(f"{path / MANIFEST}: expected format {FORMAT!r}, found {man.get('format')!r}")
    if man.get("format_version", 0) > FORMAT_VERSION:
        raise DeltakitFileError(f"{path}: written by a newer deltakit (format {man['format_version']}, "
                                f"this one reads {FORMAT_VERSION})")
    for key, kind in _REQUIRED.items():
        if not isinstance(man.get(key), kind):
            found = "nothing" if key not in man else type(man[key]).__name__
            raise DeltakitFileError(f"{path / MANIFEST}: expected key {key!r} ({kind.__name__}), found {found}")
    for key in ("file", "sha256"):
        if not isinstance(man["tensors"].get(key), str):
            raise DeltakitFileError(f"{path / MANIFEST}: expected tensors.{key} (str), found "
                                    f"{type(man['tensors'].get(key)).__name__ if key in man['tensors'] else 'nothing'}")
    return man


def load_adapter(model: nn.Module, path: str | os.PathLike, name: str | None = None, *,
                 strict_base: bool = True, activate: bool = True, trainable: bool = True) -> Adapter:
    """Attach the adapter saved at ``path`` to ``model``; any error leaves ``model`` unchanged.

    ``strict_base`` refuses a base that differs from the one the adapter was trained on
    (the whole-base fingerprint, :mod:`deltakit.core.fingerprint`); the architecture,
    targets and shapes are always checked.
    """
    path = Path(path)
    man = read_manifest(path)
    name = name or man.get("name") or "default"
    if name in adapters(model):
        raise AdapterLoadError(f"an adapter named {name!r} is already attached")
    spec = get_method(man["method"])
    try:
        config = spec.config.from_dict(man["config"])
    except (TypeError, ConfigError) as e:
        raise AdapterLoadError(f"{path / MANIFEST}: bad config for method {spec.name!r}: {e}") from None
    tensor_file = path / man["tensors"]["file"]
    state = _read_checked(tensor_file, man["tensors"]["sha256"])
    paths, full_paths = _check_targets(model, man, path)
    if strict_base:
        same, now = fingerprint_matches(model, man["base_fingerprint"], targets=paths, exclude=full_paths)
        if not same:
            raise AdapterLoadError(
                f"base model differs from the one the adapter was trained on (fingerprint {now[:20]}... vs "
                f"{man['base_fingerprint'][:20]}...); pass strict_base=False (CLI: --no-strict-base) to load anyway")
    return attach_state(model, config, state, name=name, targets=paths, full_targets=full_paths,
                        activate=activate, trainable=trainable, source=str(tensor_file))


def _read_checked(tensor_file: Path, sha256: str) -> dict:
    if not tensor_file.is_file():
        raise DeltakitFileError(f"expected tensor file {tensor_file}, found nothing")
    digest = sha256_file(tensor_file)
    if digest != sha256:
        raise DeltakitFileError(f"{tensor_file}: sha256 {digest[:12]}... does not match the manifest's "
                                f"{sha256[:12]}... (corrupt or modified file)")
    return load_tensors(tensor_file)


def _check_targets(model: nn.Module, man: dict, path: Path) -> tuple[list[str], list[str]]:
    """``(targets, modules_to_save)`` of the manifest, checked against ``model``: architecture,
    that every target exists with the recorded type and parameter shapes."""
    base_info = man.get("base_model") or {}
    want, have = base_info.get("model_type"), getattr(getattr(model, "config", None), "model_type", None)
    trained_on = f"{want or '?'} ({base_info.get('class') or '?'})"
    if want and have and want != have:
        raise AdapterLoadError(f"{path}: the adapter was trained on a {trained_on} model; this model is a "
                               f"{have} ({type(model).__name__}), a different architecture")
    module_names = {n for n, _ in model.named_modules()}
    paths, full_paths = [], []
    for p, info in man["targets"].items():
        if p not in module_names:
            raise AdapterLoadError(f"adapter target {p!r} does not exist in {type(model).__name__} (the adapter "
                                   f"was trained on {trained_on}: a different architecture?)")
        base = model.get_submodule(p)
        base = base.base if isinstance(base, DeltaLayer) else base
        if type(base).__name__ != info["type"]:
            raise AdapterLoadError(f"target {p!r}: adapter expects a {info['type']}, model has {type(base).__name__}")
        for k, shape in info["shapes"].items():
            t = getattr(base, k, None)
            if t is None or list(t.shape) != shape:
                raise AdapterLoadError(f"target {p}.{k}: adapter expects shape {shape}, model has "
                                       f"{None if t is None else list(t.shape)}")
        (full_paths if info["method"] == "full" else paths).append(p)
    return paths, full_paths
