"""AdapterLibrary: a directory of adapters, content-addressed, indexed in SQLite, with the
routing data (Arrow prototypes, a clustering embedding) computed once at registration.

>>> lib = AdapterLibrary("my-library")                                    # doctest: +SKIP
>>> lib.add("runs/sst2", model=base, task="sst2", tags=["sentiment"])     # doctest: +SKIP
>>> [e.ref for e in lib.list(tag="sentiment")]                            # doctest: +SKIP
['sst2@1']
>>> lib.load(base, "sst2")                                                # doctest: +SKIP

Content address: the sha256 of the adapter's tensor file (``adapter.safetensors``), the same
digest its manifest records, so ``verify`` re-hashes the stored file and compares it with both.
The same tensors added twice are stored once; two entries may share an object only if their
method, config and targets agree (the tensors alone do not say how to use them).

Base: the library records one base model, as :func:`deltakit.model_fingerprint` of it with the
first adapter's ``modules_to_save`` left out (a task head is the adapter's own). Every ``add``
needs the base model (a peft import and the routing data need it anyway): the model must have
the library's fingerprint, and the adapter must have been trained on it (its manifest's
fingerprint, checked as :func:`deltakit.load_adapter` does); otherwise the add is refused.
"""
from __future__ import annotations

import json
import os
import shutil
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path

from torch import Tensor, nn

from ..core.adapter import Adapter, detach
from ..core.fingerprint import fingerprint_matches, model_fingerprint
from ..core.layer import DeltaLayer
from ..io.adapter_files import MANIFEST, load_adapter, read_manifest, save_adapter
from ..io.files import sha256_file, write_json
from ..io.peft import CONFIG as PEFT_CONFIG
from ..io.peft import import_peft
from ..io.tensors import load_tensors, save_tensors
from ..taskvec import TaskVector
from . import _store
from ._index import Entry, Index, LibraryError
from ._routing import routing_data

__all__ = ["AdapterLibrary", "Entry", "LibraryError", "VerifyReport"]

_TMP_NAME = "__deltakit_library__"  # the name an adapter is attached under while it is measured
ROUTING_FORMAT = "deltakit.library.routing"


@dataclass
class VerifyReport:
    """What ``verify`` found. ``ok`` only when nothing is missing, corrupt or left over."""

    checked: int = 0
    missing: list[str] = field(default_factory=list)
    corrupt: list[str] = field(default_factory=list)
    orphans: list[str] = field(default_factory=list)
    cleaned: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not (self.missing or self.corrupt or self.orphans)


@dataclass(frozen=True)
class _Staged:
    """An adapter copied into the staging area and measured, ready to publish."""

    obj: Path
    sha: str
    manifest: dict
    routing: Path
    routing_sha: str
    fingerprint: str  # the model's, with the library's exclusions
    exclude: list[str]  # the exclusions used (the library's, or this adapter's modules_to_save)
    source: Path


class AdapterLibrary:
    """A library rooted at a directory (created on first use). Safe for many processes at once:
    writers take a lock file, readers see committed entries only (SQLite WAL)."""

    def __init__(self, root: str | os.PathLike) -> None:
        self.layout = _store.Layout(Path(root))
        self.layout.make()
        self.index = Index(self.layout.index)

    @property
    def root(self) -> Path:
        return self.layout.root

    @property
    def base_fingerprint(self) -> str | None:
        """The base model's fingerprint, recorded by the first add (None while empty of it)."""
        return self.index.meta("base_fingerprint")

    def _exclude(self, manifest: dict) -> list[str]:
        """Module paths the base fingerprint leaves out: the library's, or (first add) the
        adapter's modules_to_save."""
        recorded = self.index.meta("base_exclude")
        if recorded is not None:
            return json.loads(recorded)
        return sorted(p for p, t in manifest["targets"].items() if t.get("method") == "full")

    # ------------------------------------------------------------------ add
    def add(self, source: str | os.PathLike, *, model: nn.Module, name: str | None = None,
            version: int | None = None, task: str | None = None, description: str | None = None,
            tags: Iterable[str] = (), groups: Iterable[str] = (),
            lineage: Iterable[tuple[int | str, str]] = ()) -> Entry:
        """Register the deltakit or peft adapter directory ``source`` (trained on ``model``).

        ``name`` defaults to the manifest's name (else the directory's); ``version`` to one
        more than the newest of that name. ``lineage``: ``(parent id or NAME@VERSION, how)``
        pairs, ``how`` e.g. ``"merge"`` or ``"compress"``. ``model`` is left as it was.
        """
        source = Path(source)
        if version is not None and (not isinstance(version, int) or version < 1):
            raise LibraryError(f"version: expected a positive integer, found {version!r}")
        with _store.staging(self.layout) as st:
            staged = self._stage(source, model, st)
            name = _check_name(name or staged.manifest.get("name") or source.resolve().name)
            man = staged.manifest
            row = {"name": name, "version": version, "sha256": staged.sha, "routing_sha256": staged.routing_sha,
                   "base_fingerprint": man["base_fingerprint"], "method": man["method"], "task": task,
                   "description": description, "created": time.time(), "manifest": man,
                   "size": (staged.obj / _tensor_file(man)).stat().st_size}
            self._commit(model, staged, row, list(tags), list(groups), list(lineage))
        return self.get(f"{name}@{row['version']}")

    def _stage(self, source: Path, model: nn.Module, st: Path) -> _Staged:
        """Copy or import ``source`` into ``st``, check it, compute its routing data."""
        obj = st / "object"
        if (source / MANIFEST).is_file():
            man = read_manifest(source)
            obj.mkdir()
            for f in (MANIFEST, _tensor_file(man)):
                shutil.copyfile(source / f, obj / f)
        elif (source / PEFT_CONFIG).is_file():
            _import_peft(model, source, obj)
        else:
            raise LibraryError(f"expected an adapter directory ({MANIFEST}) or a peft adapter directory "
                               f"({PEFT_CONFIG}) at {source}, found {'neither' if source.is_dir() else 'no directory'}")
        man = read_manifest(obj)
        sha = sha256_file(obj / _tensor_file(man))
        if sha != man["tensors"]["sha256"]:
            raise LibraryError(f"{source}: tensor file sha256 {sha[:12]}... does not match its manifest's "
                               f"{man['tensors']['sha256'][:12]}... (corrupt source)")
        _check_trained_on(model, man, source)
        exclude = self._exclude(man)
        fingerprint = _fingerprint(model, exclude, man)
        _check_base(self.base_fingerprint, fingerprint, source)  # early, before the routing maths
        rt = st / "routing.safetensors"
        save_tensors(rt, _measure(model, obj), metadata={"format": ROUTING_FORMAT})
        return _Staged(obj, sha, man, rt, sha256_file(rt), fingerprint, exclude, source)

    def _settle_base(self, db, model: nn.Module, s: _Staged) -> None:
        """Inside the add's transaction: record the base if this is the first add, else check it
        again (another writer may have recorded it, with other exclusions, since staging)."""
        base, recorded = self.index.meta("base_fingerprint", db), self.index.meta("base_exclude", db)
        fingerprint = s.fingerprint
        if recorded is not None and json.loads(recorded) != s.exclude:
            fingerprint = _fingerprint(model, json.loads(recorded), s.manifest)
        if base is None:
            Index.set_meta(db, "base_fingerprint", fingerprint)
            Index.set_meta(db, "base_exclude", json.dumps(s.exclude))
        _check_base(base, fingerprint, s.source)

    def _commit(self, model: nn.Module, s: _Staged, row: dict, tags: list[str], groups: list[str],
                lineage: list) -> int:
        """Publish the files and insert the row, under the writer lock, in one transaction;
        on any failure remove the files this call published that no entry uses."""
        created: list[Path] = []
        with _store.writer_lock(self.layout):
            try:
                with self.index.transaction() as db:
                    self._settle_base(db, model, s)
                    row["version"] = row["version"] or Index.next_version(db, row["name"])
                    self._check_same_use(db, s)
                    parents = [(self._parent_id(p, how, db), how) for p, how in lineage]
                    created += self._publish(s)
                    return Index.insert(db, row, tags, groups, parents)
            except BaseException:
                self._drop_unused(created)
                raise

    def _publish(self, s: _Staged) -> list[Path]:
        """Rename the staged object and routing file into place. A stored copy whose hash no
        longer matches (a corrupt file) is replaced by the fresh one: adding an adapter again
        repairs it. Returns the paths created."""
        out = []
        obj, rt = self.layout.object(s.sha), self.layout.routing_file(s.routing_sha)
        if obj.exists() and _store.hash_object(obj, _tensor_file(s.manifest)) != s.sha:
            _store.remove_path(obj)
        if rt.exists() and sha256_file(rt) != s.routing_sha:
            _store.remove_path(rt)
        for src, dst in ((s.obj, obj), (s.routing, rt)):
            if _store.publish(src, dst):
                out.append(dst)
        return out

    def _check_same_use(self, db, s: _Staged) -> None:
        """Entries sharing an object must agree on how its tensors are used."""
        for other in self.index.entries(sha256=s.sha, db=db):
            if _use(other.manifest) != _use(s.manifest):
                raise LibraryError(f"the same tensors are already stored as {other.ref} with a different "
                                   "method, config or targets; save the adapter again with its own tensors")

    def _parent_id(self, parent: int | str, how: str, db) -> int:
        if not isinstance(how, str) or not how:
            raise LibraryError(f"lineage: expected how the entry came from its parent (e.g. 'merge'), found {how!r}")
        return parent if isinstance(parent, int) else self.index.resolve(parent, db).id

    def _drop_unused(self, paths: Sequence[Path]) -> None:
        with self.index.connect() as db:
            objects, routing = self.index.referenced(db)
        for p in paths:
            if p.name not in objects and p.name.removesuffix(".safetensors") not in routing:
                _store.remove_path(p)

    # ------------------------------------------------------------------ read
    def list(self, *, name: str | None = None, task: str | None = None, tag: str | None = None,
             group: str | None = None, method: str | None = None) -> list[Entry]:
        """Entries matching every filter given (exact matches), by name then version."""
        return [self._with_paths(e) for e in
                self.index.entries(name=name, task=task, tag=tag, group=group, method=method)]

    def get(self, ref: str) -> Entry:
        """``NAME`` (newest version) or ``NAME@VERSION``, with ``path`` (a loadable adapter
        directory; do not write into it) and ``routing_path``."""
        return self._with_paths(self.index.resolve(ref))

    def load(self, model: nn.Module, ref: str, name: str | None = None, **kwargs) -> Adapter:
        """Attach entry ``ref`` to ``model`` (:func:`deltakit.load_adapter`, which re-checks the
        tensor file's sha256 and the base); ``name`` defaults to the entry's name."""
        e = self.get(ref)
        return load_adapter(model, e.path, name=name or e.name, **kwargs)

    def routing(self, ref: str) -> dict[str, Tensor]:
        """The entry's routing tensors: ``prototype.<module path>`` (in,) and ``embedding`` (64,)."""
        return load_tensors(self.get(ref).routing_path)

    def _with_paths(self, e: Entry) -> Entry:
        return replace(e, path=self.layout.object(e.sha256), routing_path=self.layout.routing_file(e.routing_sha256))

    # ------------------------------------------------------------------ remove / verify
    def remove(self, ref: str) -> Entry:
        """Delete the entry, then its object and routing files unless another entry uses them.
        A crash between the two leaves unused files, which ``verify`` reports and cleans."""
        with _store.writer_lock(self.layout):
            with self.index.transaction() as db:
                e = self._with_paths(self.index.resolve(ref, db))
                Index.delete(db, e.id)
            self._drop_unused([e.path, e.routing_path])
        return e

    def verify(self, *, clean: bool = False) -> VerifyReport:
        """Re-hash every stored file against the index; list missing, corrupt and unused files.
        ``clean`` removes the unused ones (debris of crashed adds and removes)."""
        from ._verify import verify
        with _store.writer_lock(self.layout):
            return verify(self, clean=clean)


def _check_name(name: str) -> str:
    if not name or "@" in name or name != name.strip():
        raise LibraryError(f"entry name: expected a non-empty name without '@' or outer spaces, found {name!r}")
    return name


def _tensor_file(manifest: dict) -> str:
    return manifest["tensors"]["file"]


def _use(manifest: dict) -> tuple:
    return manifest["method"], json.dumps(manifest["config"], sort_keys=True), json.dumps(
        {p: t.get("method") for p, t in manifest["targets"].items()}, sort_keys=True)


def _fingerprint(model: nn.Module, exclude: list[str], manifest: dict) -> str:
    """The model's fingerprint as the library records it (sampled or full, like the manifest's)."""
    return model_fingerprint(model, exclude=exclude, full=manifest["base_fingerprint"].startswith("full-"))


def _check_base(base: str | None, fingerprint: str, source: Path) -> None:
    if base is not None and base != fingerprint:
        raise LibraryError(f"{source}: the model given for it is not this library's base (fingerprint "
                           f"{fingerprint[:24]}... vs the library's {base[:24]}...)")


def _check_trained_on(model: nn.Module, man: dict, source: Path) -> None:
    """The adapter's recorded base fingerprint must be ``model``'s."""
    full = [p for p, t in man["targets"].items() if t.get("method") == "full"]
    same, now = fingerprint_matches(model, man["base_fingerprint"], targets=[p for p in man["targets"] if p not in full],
                                    exclude=full)
    if not same:
        raise LibraryError(f"{source}: the adapter was trained on another base than the model given (fingerprint "
                           f"{man['base_fingerprint'][:24]}... vs the model's {now[:24]}...)")


def _import_peft(model: nn.Module, source: Path, out: Path) -> None:
    """A peft directory, saved as a deltakit adapter directory at ``out`` (model left as it was)."""
    adapter = import_peft(model, source, name=_TMP_NAME, activate=False)
    try:
        save_adapter(adapter, out)
    finally:
        detach(model, _TMP_NAME)
    man = read_manifest(out)
    man["name"] = source.resolve().name
    write_json(out / MANIFEST, man)


def _layouts(model: nn.Module) -> dict[str, str]:
    """Module path -> how its weight meets the input, where it is not (out, in): see routing_data."""
    out = {}
    for path, m in model.named_modules():
        base = getattr(m, "base", m) if isinstance(m, DeltaLayer) else m
        if type(base).__name__ == "Conv1D":
            out[path] = "in_out"
        elif isinstance(base, nn.Embedding):
            out[path] = "ids"
    return out


def _measure(model: nn.Module, obj: Path) -> dict[str, Tensor]:
    """Attach the staged adapter (checking it was trained on ``model``), read its deltas as a task
    vector (LoRA family stays factored) and compute its routing data; detach again."""
    adapter = load_adapter(model, obj, name=_TMP_NAME, strict_base=True, activate=False, trainable=False)
    try:
        tv = TaskVector.from_adapter(adapter, include_full=False)
        return routing_data(((n, tv.get(n)) for n in sorted(tv.keys())), _layouts(model))
    finally:
        detach(model, _TMP_NAME)
