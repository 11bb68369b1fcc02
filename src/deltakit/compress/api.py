"""Compress a delta end to end: open the source, encode every tensor (one codec or a budget), write.

Sources (:func:`open_delta`): a deltakit adapter directory (its dense task vector, through
``TaskVector.from_adapter`` on the base its manifest records; the adapter's base fingerprint
carries over), a task-vector directory (a compressed one too), or a fine-tuned checkpoint with
its base checkpoint (``finetuned - base``, streamed; the base's fingerprint is recorded).
Memory: one dense tensor at a time, plus the compressed values until they are written.

>>> d = open_delta("runs/ft", base="runs/base")                         # doctest: +SKIP
>>> compress(d, "runs/ft.topk", codec="topk", knobs={"density": 0.05})  # doctest: +SKIP
>>> compress(d, "runs/ft.16x", ratio=16)                                # doctest: +SKIP
"""
from __future__ import annotations

import os
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from ..io.files import DeltakitFileError
from ..io.tensors import LazyCheckpoint
from ..taskvec import TaskVector
from .budget import Allocation, Setting, plan_budget, sources
from .container import Source, checkpoint_fingerprint, load_compressed, write_compressed

__all__ = ["DeltaSource", "CompressResult", "open_delta", "compress", "single_codec_sources", "is_task_vector"]


@dataclass
class DeltaSource:
    """A delta to compress and the base it applies to (``base_fingerprint`` None: unknown)."""

    tv: TaskVector
    base_fingerprint: str | None = None
    base_exclude: list[str] = field(default_factory=list)
    info: dict[str, Any] = field(default_factory=dict)
    model: Any = None       # an adapter's base with the adapter attached (runs data for activation stats)
    model_path: str | None = None


@dataclass(frozen=True)
class CompressResult:
    path: Path
    allocation: Allocation | None
    kept: dict[str, str]  # single-codec mode: entries the codec could not take -> why


def _is_adapter(p: Path) -> bool:
    return (p / "adapter.json").is_file()


def is_task_vector(p: Path) -> bool:
    """A task-vector file or directory (a compressed delta is one)."""
    try:
        return str(LazyCheckpoint(p).metadata.get("deltakit", "")).startswith("deltakit.taskvector/")
    except DeltakitFileError:
        return False


def _from_adapter(path: Path, model: str | None) -> DeltaSource:
    from ..io.adapter_files import load_adapter, read_manifest
    from ..io.models import load_base_for

    man = read_manifest(path)
    if man.get("kind") != "weight":
        raise DeltakitFileError(f"{path}: expected an adapter with a weight delta, found {man.get('method')!r} "
                                f"(an activation delta has no dW to compress)")
    base, base_path = load_base_for(man, model)
    adapter = load_adapter(base, path)  # strict: a modules_to_save delta is relative to the base
    tv = TaskVector.from_adapter(adapter)
    exclude = sorted(p for p, t in man["targets"].items() if t["method"] == "full")
    return DeltaSource(tv, man["base_fingerprint"], exclude,
                       {"source": "adapter", "path": str(path), "method": man["method"]}, model=base,
                       model_path=str(base_path))


def open_delta(src: str | os.PathLike, *, base: str | os.PathLike | None = None,
               model: str | None = None) -> DeltaSource:
    """The delta ``src`` holds: an adapter directory (``model`` overrides its recorded base), a
    task-vector directory (``base``: a checkpoint whose fingerprint to record), or a fine-tuned
    checkpoint (``base`` required: the delta is ``src - base``)."""
    p = Path(src)
    if p.is_dir() and _is_adapter(p):
        if base is not None:
            raise ValueError(f"{p} is an adapter: it records its base; use --model to override it, not --base")
        return _from_adapter(p, model)
    if is_task_vector(p):
        f = load_compressed(p)
        fp, exclude = f.base_fingerprint, list(f.header.get("base_exclude") or [])
        if base is not None:
            fp, exclude = checkpoint_fingerprint(base), []
        return DeltaSource(f.task_vector(), fp, exclude, {"source": "task vector", "path": str(p)})
    if base is None:
        raise ValueError(f"{p}: expected an adapter directory or a task vector, or a checkpoint with --base BASE "
                         f"(to compress checkpoint - base)")
    tv = TaskVector.from_checkpoints(p, base)
    return DeltaSource(tv, checkpoint_fingerprint(base), [], {"source": "checkpoints", "path": str(p),
                                                             "base": str(base)})


def single_codec_sources(tv: TaskVector, codec: str, knobs: Mapping[str, Any] | None = None,
                         kept: dict[str, str] | None = None) -> dict[str, Source]:
    """Every entry encoded with ``codec`` when written; an entry the codec refuses (a 1-d bias
    for a matrix codec) is kept as it is and recorded in ``kept`` (name -> reason)."""
    setting = Setting(codec, tuple((knobs or {}).items()))
    recorded = setting.recorded_knobs  # a bad knob fails here, before any work

    def encode_one(name: str) -> Source:
        value = tv.get(name)
        try:
            return Source(setting.encode(value), codec, recorded)
        except (ValueError, TypeError) as e:
            if kept is not None:
                kept[name] = str(e).splitlines()[0] if str(e) else type(e).__name__
            return Source(value)

    return {n: Source(lambda n=n: encode_one(n), codec, recorded) for n in tv.keys()}


def compress(delta: DeltaSource | TaskVector, out: str | os.PathLike, *, codec: str | None = None,
             knobs: Mapping[str, Any] | None = None, target_bytes: int | None = None, ratio: float | None = None,
             codecs: Iterable[str] | None = None, stats: Mapping[str, torch.Tensor] | None = None,
             progress: bool = False) -> CompressResult:
    """Write ``delta`` compressed to ``out`` (atomic): with one ``codec`` and its ``knobs``, or
    within a budget (``target_bytes`` or ``ratio``; candidates from ``codecs``, default every
    registered codec plus keep) by :func:`deltakit.compress.budget.plan_budget`."""
    d = delta if isinstance(delta, DeltaSource) else DeltaSource(delta)
    budgeted = target_bytes is not None or ratio is not None
    if (codec is None) == (not budgeted):
        raise ValueError("expected either a codec or a budget (target size / ratio), found "
                         + ("both" if codec else "neither"))
    if codec is not None and (codecs is not None or stats is not None):
        raise ValueError("codecs and activation stats choose a budget's candidates; give a target size or ratio")
    kept: dict[str, str] = {}
    alloc = None
    if codec is not None:
        entries = single_codec_sources(d.tv, codec, knobs, kept)
        info, limit = {**d.info, "mode": "codec", "codec": codec}, None
    else:
        alloc = plan_budget(d.tv, target_bytes=target_bytes, ratio=ratio, codecs=codecs, stats=stats,
                            progress=progress)
        entries = sources(d.tv, alloc)
        info = {**d.info, "mode": "budget", "budget_bytes": alloc.budget, "method": alloc.method,
                "weighted": bool(stats)}
        limit = alloc.budget
    path = write_compressed(out, entries, base_fingerprint=d.base_fingerprint, base_exclude=d.base_exclude,
                            info=info, max_bytes=limit, progress=progress)
    return CompressResult(path, alloc, kept)

