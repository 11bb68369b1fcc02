"""The compressed-delta file: a task-vector directory whose manifest also says how each entry was made.

Decision: no parallel format. A compressed delta is written as a ``deltakit.taskvector/2``
directory (:mod:`deltakit.taskvec._taskvector`: HF-layout safetensors, the JSON manifest in
the header metadata, per entry ``codec``, ``shape``, ``tensors`` (part -> stored key) and
``meta``), so ``TaskVector.load``, merge, apply and export read it unchanged. This module adds
optional fields, which older readers ignore and which old files simply lack (they load too):

- per entry: ``dtype`` (of the original delta), ``compressor`` and ``knobs`` (what encoded it;
  ``null`` for an entry kept as it was), ``bytes`` (the stored parts' bytes, counted from the
  planned tensors, which are what is written), ``numel`` and ``sha256`` (over the parts' raw
  bytes in part-name order: a corrupted part is caught when its entry is read);
- per file, metadata key ``compressed``: ``{"format": "deltakit.compressed/1",
  "base_fingerprint": str | null, "base_exclude": [module paths], ...}``. The fingerprint is
  :mod:`deltakit.core.fingerprint`'s whole-base one, from a model (as adapter files record it)
  or computed the same way over a checkpoint's tensors.

Writes are atomic (:func:`deltakit.io.tensors.write_checkpoint`, marked as a ``compressed``
output for ``--overwrite``). Reading is lazy: headers at open, one entry's parts when it is
asked for. A truncated file, a bad manifest, an unknown codec, a corrupted entry or a base
mismatch is a one-line :class:`~deltakit.io.files.DeltakitFileError`.
"""
from __future__ import annotations

import hashlib
import json
import math
import os
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from ..core.fingerprint import model_fingerprint, tensors_fingerprint
from ..io.files import DeltakitFileError
from ..io.tensors import LazyCheckpoint, PlannedTensor, write_checkpoint
from ..taskvec import Delta, TaskVector, as_dense
from ..taskvec._values import DENSE, decode, encode
from ._dtypes import dtype_name, dtype_of

__all__ = ["FORMAT", "KIND", "Source", "EntryRecord", "CompressedFile", "write_compressed", "load_compressed",
           "base_fingerprint", "checkpoint_fingerprint"]

FORMAT = "deltakit.compressed/1"
KIND = "compressed"
_TV_FORMAT = "deltakit.taskvector/2"


@dataclass(frozen=True)
class Source:
    """One entry to write: its value (or a zero-argument function computing it or a resolved
    Source, called once while planning, and once more when written if it turns out dense) and
    what made it (``compressor`` None: the entry kept as it was)."""

    value: Delta | Callable[[], Delta]
    compressor: str | None = None
    knobs: Mapping[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class EntryRecord:
    """What the manifest says about one entry (old task-vector files: no compressor, no hash)."""

    name: str
    codec: str
    shape: tuple[int, ...]
    dtype: str | None
    compressor: str | None
    knobs: dict[str, Any]
    bytes: int
    sha256: str | None
    parts: dict[str, str]
    meta: dict[str, Any]

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    @property
    def bits_per_param(self) -> float:
        return 8.0 * self.bytes / max(1, self.numel)

    @property
    def original_bytes(self) -> int:
        """The dense delta's bytes in its original dtype (fp32 when unrecorded)."""
        itemsize = dtype_of(self.dtype).itemsize if self.dtype else 4
        return self.numel * itemsize

    @property
    def ratio(self) -> float:
        return self.original_bytes / self.bytes if self.bytes else math.inf

    @property
    def label(self) -> str:
        """``topk(density=0.1)``; the stored codec for an entry kept as it was."""
        if self.compressor is None:
            return self.codec
        return f"{self.compressor}({', '.join(f'{k}={v}' for k, v in self.knobs.items())})"


# ----------------------------------------------------------------------------- fingerprints
def checkpoint_fingerprint(base: str | os.PathLike | LazyCheckpoint, *, exclude: Iterable[str] = (),
                           full: bool = False) -> str:
    """The whole-base fingerprint of a checkpoint, as :func:`deltakit.model_fingerprint` computes
    it for the model the checkpoint holds (memory-mapped: only the sampled elements are read)."""
    ck = base if isinstance(base, LazyCheckpoint) else LazyCheckpoint(base)
    return tensors_fingerprint(ck.keys(), ck.mapped, exclude=exclude, full=full)


def base_fingerprint(base, *, exclude: Iterable[str] = (), full: bool = False) -> str:
    """Fingerprint of ``base``: an ``nn.Module``, a checkpoint directory / file or a LazyCheckpoint."""
    if isinstance(base, torch.nn.Module):
        return model_fingerprint(base, exclude=exclude, full=full)
    return checkpoint_fingerprint(base, exclude=exclude, full=full)


# ----------------------------------------------------------------------------- writing
def _digest(parts: Mapping[str, torch.Tensor]) -> str:
    h = hashlib.sha256()
    for p in sorted(parts):
        t = parts[p].detach().to("cpu").contiguous().reshape(-1)
        h.update(f"{p}|{tuple(parts[p].shape)}|{t.dtype}|".encode())
        h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


def _resolve(src: Source) -> Source:
    """``src`` with its value computed; a function may also return a whole :class:`Source` (an
    encoder that decides per tensor, e.g. keeping an entry its codec cannot take, says so)."""
    if not callable(src.value) or isinstance(src.value, torch.Tensor):
        return src
    out = src.value()
    return out if isinstance(out, Source) else Source(out, src.compressor, src.knobs)


class _Plan:
    """The write plan built entry by entry: compact parts are held (small by design), dense
    entries are recomputed when written so memory stays one dense tensor."""

    def __init__(self) -> None:
        self.items: list[PlannedTensor] = []
        self.held: dict[str, torch.Tensor] = {}
        self.dense: dict[str, tuple[Source, str]] = {}   # stored key -> (source, sha256)
        self.manifest: dict[str, dict[str, Any]] = {}

    def add(self, name: str, given: Source) -> None:
        src = _resolve(given)
        value = src.value
        codec, parts, meta = encode(value)
        parts = {p: t.detach() for p, t in parts.items()}
        stored = {"value": name} if codec == DENSE else {p: f"{name}.{codec}_{p}" for p in parts}
        digest = _digest(parts)
        for p, t in parts.items():
            self.items.append(PlannedTensor(stored[p], tuple(t.shape), t.dtype))
            if codec == DENSE:
                self.dense[stored[p]] = (given, digest)  # not the value: recomputed when written
            else:
                self.held[stored[p]] = t
        self.manifest[name] = {
            "codec": codec, "shape": list(value.shape), "tensors": stored, "meta": meta,
            "dtype": dtype_name(value.dtype), "compressor": src.compressor, "knobs": dict(src.knobs),
            "bytes": sum(t.nbytes for t in parts.values()), "numel": math.prod(value.shape), "sha256": digest}

    def produce(self, it: PlannedTensor) -> torch.Tensor:
        if it.name in self.held:
            return self.held.pop(it.name)
        src, digest = self.dense[it.name]
        t = as_dense(_resolve(src).value)
        if _digest({"value": t}) != digest:  # the source gave other bytes the second time
            raise DeltakitFileError(f"{it.name}: the dense entry changed between planning and writing "
                                    f"(a non-deterministic source?); nothing was written")
        return t


def write_compressed(path: str | os.PathLike, entries: Mapping[str, Source | Delta], *,
                     base_fingerprint: str | None = None, base_exclude: Iterable[str] = (),
                     info: Mapping[str, Any] | None = None, max_bytes: int | None = None,
                     progress: bool = False, kind: str = KIND, desc: str = "encoding") -> Path:
    """Write ``entries`` (name -> :class:`Source`, or a plain value kept as it is) to ``path``.

    Every entry is computed once while planning (one at a time; a compressed value is held
    until written, a dense one is recomputed when written). ``base_fingerprint``: the base the
    delta applies to (:func:`base_fingerprint`), with the module paths it excluded;
    ``info``: JSON-able extras stored beside it (the source, the budget...). ``max_bytes``:
    refuse (before anything is written) if the encoded parts take more. ``kind``: the output
    kind ``--overwrite`` checks (a decompressed delta is a ``taskvector``); ``desc``: the
    planning pass's progress-bar label. Atomic.
    """
    plan = _Plan()
    names = list(entries)
    bar = _bar(progress, len(names), desc)
    for name in names:
        src = entries[name]
        plan.add(name, src if isinstance(src, Source) else Source(src))
        if bar is not None:
            bar.update(1)
    if bar is not None:
        bar.close()
    total = sum(e["bytes"] for e in plan.manifest.values())
    if max_bytes is not None and total > max_bytes:
        raise DeltakitFileError(f"expected at most {max_bytes:,} bytes of encoded parts, found {total:,}; "
                                f"nothing was written")
    head = {"format": FORMAT, "base_fingerprint": base_fingerprint, "base_exclude": sorted(base_exclude),
            **(dict(info) if info else {})}
    meta = {"deltakit": _TV_FORMAT, "entries": json.dumps(plan.manifest, separators=(",", ":")),
            "compressed": json.dumps(head, separators=(",", ":"))}
    return write_checkpoint(path, plan.items, plan.produce, metadata=meta, kind=kind, progress=progress,
                            desc="writing")


def _bar(progress: bool, total: int, desc: str):
    if not progress:
        return None
    from tqdm.auto import tqdm
    return tqdm(total=total, desc=desc, unit="tensor")


# ----------------------------------------------------------------------------- reading
def _load_codecs() -> None:
    from . import codecs  # noqa: F401  (a file may name any built-in codec)


def _record(path: Path, ck: LazyCheckpoint, name: str, e: Mapping[str, Any]) -> EntryRecord:
    parts = dict(e["tensors"])
    stored = sum(ck.nbytes(k) for k in parts.values())
    if "bytes" in e and e["bytes"] != stored:
        raise DeltakitFileError(f"{path}: entry {name!r} expected {e['bytes']} stored bytes (the manifest), "
                                f"found {stored}")
    knobs = e.get("knobs") or {}
    if not isinstance(knobs, dict) or not isinstance(e.get("compressor"), (str, type(None))):
        raise DeltakitFileError(f"{path}: entry {name!r} expected a compressor name and a knobs object, "
                                f"found {e.get('compressor')!r} and {knobs!r}")
    dtype = e.get("dtype") or (dtype_name(ck.dtype(parts["value"])) if e["codec"] == DENSE else None)
    return EntryRecord(name, e["codec"], tuple(int(s) for s in e["shape"]), dtype, e.get("compressor"), knobs,
                       stored, e.get("sha256"), parts, dict(e.get("meta") or {}))


class CompressedFile:
    """An opened compressed-delta file: records now, entries lazily (one tensor at a time).

    ``records``: per entry, what the manifest says; ``task_vector()``: the entries as a lazy
    :class:`TaskVector` whose every read checks the entry's sha256 and shape.
    """

    def __init__(self, path: str | os.PathLike) -> None:
        _load_codecs()
        self.path = Path(path)
        TaskVector.load(self.path)  # the task-vector checks: manifest, stored tensors, known codecs
        self._ck = LazyCheckpoint(self.path)
        if self._ck.metadata.get("deltakit") != _TV_FORMAT:
            raise DeltakitFileError(f"{self.path}: expected a {_TV_FORMAT} file, found "
                                    f"{self._ck.metadata.get('deltakit')!r} (re-save an older task vector "
                                    f"with TaskVector.load(path).save(new_path))")
        entries = json.loads(self._ck.metadata["entries"])
        self.records = {n: _record(self.path, self._ck, n, e) for n, e in entries.items()}
        self.header = self._header()

    def _header(self) -> dict[str, Any]:
        raw = self._ck.metadata.get("compressed")
        if raw is None:
            return {"format": None, "base_fingerprint": None, "base_exclude": []}
        try:
            head = json.loads(raw)
        except json.JSONDecodeError as e:
            raise DeltakitFileError(f"{self.path}: expected a JSON 'compressed' record, found {e}") from None
        if not isinstance(head, dict) or head.get("format") != FORMAT:
            raise DeltakitFileError(f"{self.path}: expected compressed format {FORMAT!r}, found "
                                    f"{head.get('format') if isinstance(head, dict) else head!r}")
        return head

    @property
    def base_fingerprint(self) -> str | None:
        return self.header.get("base_fingerprint")

    @property
    def total_bytes(self) -> int:
        return sum(r.bytes for r in self.records.values())

    @property
    def original_bytes(self) -> int:
        return sum(r.original_bytes for r in self.records.values())

    @property
    def file_bytes(self) -> int:
        """Bytes on disk of the safetensors file(s): parts plus header and manifest."""
        return sum(f.stat().st_size for f in {self._ck.info(k).file for k in self._ck.keys()})

    def get(self, name: str) -> Delta:
        """One entry, decoded into its value; its parts' sha256 and its shape are checked."""
        r = self.records[name]
        parts = {p: self._ck.get(k) for p, k in r.parts.items()}
        if r.sha256 is not None and _digest(parts) != r.sha256:
            raise DeltakitFileError(f"{self.path}: entry {name!r} does not match its sha256 (corrupt or "
                                    f"modified file)")
        try:
            value = decode(r.codec, parts, r.meta)
        except (KeyError, ValueError, RuntimeError, TypeError) as e:
            raise DeltakitFileError(f"{self.path}: entry {name!r} ({r.codec}) does not decode: {e}") from None
        if tuple(value.shape) != r.shape:
            raise DeltakitFileError(f"{self.path}: entry {name!r} expected shape {r.shape}, found "
                                    f"{tuple(value.shape)}")
        return value

    def task_vector(self) -> TaskVector:
        return TaskVector({n: (lambda n=n: self.get(n)) for n in self.records},
                          shapes={n: r.shape for n, r in self.records.items()})

    def verify(self) -> None:
        """Read and check every entry (one at a time): a corrupt file fails here, not mid-use."""
        for n in self.records:
            self.get(n)

    def check_base(self, base) -> None:
        """Raise unless ``base`` (a model, a checkpoint dir/file) has the recorded fingerprint.
        A file that records none (a plain task vector) has nothing to check."""
        want = self.base_fingerprint
        if want is None:
            return
        exclude = self.header.get("base_exclude") or []
        now = base_fingerprint(base, exclude=exclude, full=want.startswith("full-"))
        if now != want:
            raise DeltakitFileError(f"{self.path}: the base differs from the one the delta was made against "
                                    f"(fingerprint {now[:20]}... vs recorded {want[:20]}...)")


def load_compressed(path: str | os.PathLike, *, base=None, verify: bool = False) -> CompressedFile:
    """Open a compressed-delta file (or any task-vector file); check it against ``base`` (a
    model or checkpoint) when given, and read every entry once when ``verify``."""
    f = CompressedFile(path)
    if base is not None:
        f.check_base(base)
    if verify:
        f.verify()
    return f
