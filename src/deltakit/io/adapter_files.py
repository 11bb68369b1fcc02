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
from ..core.adapter import SHARED, Adapter, adapters, base_fingerprint, build_deltas, insert
from ..core.layer import DeltaLayer
from ..core.registry import ConfigError, get_method
from .files import (DeltakitFileError, atomic_dir, load_tensors, read_json, recover, save_tensors, sha256_file,
                    write_json)

__all__ = ["save_adapter", "load_adapter", "read_manifest", "AdapterLoadError", "MANIFEST", "TENSORS"]

MANIFEST = "adapter.json"
TENSORS = "adapter.safetensors"
FORMAT = "deltakit.adapter"
FORMAT_VERSION = 1


class AdapterLoadError(ValueError):
    """An adapter directory does not fit the model it is loaded into."""


def save_adapter(adapter: Adapter, path: str | os.PathLike, *, training: dict | None = None) -> Path:
    """Write ``adapter`` as one directory, atomically (temp dir + rename).

    ``training``: what made it (JSON-able), stored as the manifest's ``training`` entry:
    ``{"steps": int, "metrics": {name: float}, "data": [{"split", "path", "sha256", "rows"}],
    "settings": {...}}`` as :func:`deltakit.train` callers write it; ``deltakit inspect`` shows it.
    """
    path = Path(path)
    fitted = [p for p, m in adapter.targets.items() if m != "full"]
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
            "base_fingerprint": base_fingerprint(adapter.model, fitted),
            "tensors": {"file": TENSORS, "sha256": sha256_file(tmp / TENSORS),
                        "bytes": (tmp / TENSORS).stat().st_size, "count": len(state)},
            "base_model": _base_model_info(adapter.model),
            "parameters": {"total": adapter.num_parameters(),
                           "trainable": adapter.num_parameters(trainable_only=True)},
            **({"training": training} if training is not None else {}),
        })
    return path


def _base_model_info(model: nn.Module) -> dict:
    """Enough to rebuild the base for ``deltakit export``: its path/hub id, class and head size."""
    cfg = getattr(model, "config", None)
    return {"name_or_path": getattr(cfg, "_name_or_path", None) or None,
            "class": type(model).__name__,
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
    return man


def load_adapter(model: nn.Module, path: str | os.PathLike, name: str | None = None, *,
                 strict_base: bool = True, activate: bool = True, trainable: bool = True) -> Adapter:
    """Attach the adapter saved at ``path`` to ``model``.

    ``strict_base`` refuses a base whose target tensors differ from the ones the
    adapter was trained on (the fingerprint); shapes are always checked.
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
    if not tensor_file.is_file():
        raise DeltakitFileError(f"expected tensor file {tensor_file}, found nothing")
    digest = sha256_file(tensor_file)
    if digest != man["tensors"]["sha256"]:
        raise DeltakitFileError(f"{tensor_file}: sha256 {digest[:12]}... does not match the manifest's "
                                f"{man['tensors']['sha256'][:12]}... (corrupt or modified file)")
    state = load_tensors(tensor_file)

    # --- check the base before building anything
    module_names = {n for n, _ in model.named_modules()}
    paths, full_paths = [], []
    for p, info in man["targets"].items():
        if p not in module_names:
            raise AdapterLoadError(f"adapter target {p!r} does not exist in {type(model).__name__}")
        base = model.get_submodule(p)
        base = base.base if isinstance(base, DeltaLayer) else base
        if type(base).__name__ != info["type"]:
            raise AdapterLoadError(f"target {p!r}: adapter expects a {info['type']}, model has {type(base).__name__}")
        for k, shape in info["shapes"].items():
            have = getattr(base, k, None)
            if have is None or list(have.shape) != shape:
                raise AdapterLoadError(f"target {p}.{k}: adapter expects shape {shape}, model has "
                                       f"{None if have is None else list(have.shape)}")
        (full_paths if info["method"] == "full" else paths).append(p)
    if strict_base:
        fp = base_fingerprint(model, paths)
        if fp != man["base_fingerprint"]:
            raise AdapterLoadError(
                f"base model differs from the one the adapter was trained on (fingerprint {fp[:12]}... vs "
                f"{man['base_fingerprint'][:12]}...); pass strict_base=False to load anyway")

    # --- build off-model, fill, then insert
    shared, deltas = build_deltas(model, config, spec, paths, full_paths)
    groups = {SHARED: shared} if shared is not None else {}
    groups.update({p: d for p, (_, d) in deltas.items()})
    expected = set()
    for prefix, module in groups.items():
        own = module.state_dict()
        expected.update(f"{prefix}.{k}" for k in own)
        sub = {}
        for k, v in own.items():
            key = f"{prefix}.{k}"
            if key not in state:
                raise AdapterLoadError(f"{tensor_file}: missing tensor {key!r}")
            if tuple(state[key].shape) != tuple(v.shape):
                raise AdapterLoadError(f"{tensor_file}: tensor {key!r} has shape {tuple(state[key].shape)}, "
                                       f"expected {tuple(v.shape)}")
            sub[k] = state[key]
        module.load_state_dict(sub, strict=True)
    extra = sorted(set(state) - expected)
    if extra:
        raise AdapterLoadError(f"{tensor_file}: unexpected tensor(s) {extra[:3]}{'...' if len(extra) > 3 else ''}")
    adapter = insert(model, name, config, spec, (shared, deltas), activate=activate)
    if not trainable:
        for p in adapter.parameters():
            p.requires_grad_(False)
    return adapter
