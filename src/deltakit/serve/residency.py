"""Which adapters the server knows, which are attached to the model, and which wait in host memory.

Three tiers, as S-LoRA / LoRAX keep them:

* **device**: attached to the model (on its device), at most ``capacity`` of them, least
  recently used evicted first;
* **host**: detached, their tensors kept as CPU state dicts (``host_capacity`` of them), so
  coming back costs a copy, not a file read and a sha256;
* **disk**: the adapter directory or the library entry, read on first use.

Names: an adapter registered from a directory (``--adapter NAME=PATH``,
``/v1/load_lora_adapter``) is served as ``NAME``; a library entry as ``NAME`` (its newest
version) or ``NAME@VERSION``. Every registration and every library version gets its own
attached name (its *key*), so a reload under the same name, or a new library version, is a
different adapter on the model and a stale copy is never served; the old key finishes its
in-flight rows and is then dropped.

Pins: each queued or running request pins its key (:meth:`acquire` / :meth:`release`).
Eviction skips pinned keys and an unload is carried out only when its last pin goes, so rows
already running never lose their adapter. ``capacity`` is therefore soft: while more distinct
adapters are pinned than it allows, all of them stay attached.

Paths: a directory named at run time must lie, after resolving symlinks, inside one of the
configured roots, and so must the tensor file its manifest names.

Threads: :meth:`resolve`, :meth:`acquire`, :meth:`release`, :meth:`register`, :meth:`unregister`
and :meth:`listing` may run on any thread (one lock guards the tables); :meth:`ensure` and
:meth:`trim` attach and detach, so only the thread that owns the model (the scheduler) calls them.
"""
from __future__ import annotations

import itertools
import os
import threading
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from torch import Tensor, nn

from ..core.adapter import adapters as attached
from ..core.adapter import detach, get_adapter
from ..core.fingerprint import model_fingerprint
from ..core.load import AdapterLoadError, attach_state
from ..io.adapter_files import load_adapter, read_manifest

__all__ = ["Residency", "UnknownAdapter", "PathNotAllowed", "Resolved"]


class UnknownAdapter(KeyError):
    """No registered adapter or library entry has this name (HTTP 404)."""

    def __str__(self) -> str:
        return str(self.args[0]) if self.args else "unknown adapter"


class PathNotAllowed(PermissionError):
    """A path outside the configured adapter directories (HTTP 400)."""


@dataclass(frozen=True)
class Resolved:
    """A request's adapter: the public name it is counted under and the attached name (key)."""

    public: str
    key: str


@dataclass
class _Source:
    """Where a key's tensors come from and what /v1/models says about it."""

    public: str
    path: Path
    sha256: str
    version: int | None = None
    lineage: list[dict] = field(default_factory=list)
    retiring: bool = False


@dataclass
class _HostCopy:
    config: object
    state: dict[str, Tensor]
    targets: list[str]
    full_targets: list[str]


def _inside(path: Path, roots: Sequence[Path]) -> bool:
    real = path.resolve()
    return any(real == r or real.is_relative_to(r) for r in roots)


class Residency:
    """The adapter tables of one served model; see the module docstring."""

    def __init__(self, model: nn.Module, *, roots: Sequence[str | os.PathLike] = (), library=None,
                 capacity: int = 8, host_capacity: int = 32, strict_base: bool = True):
        if capacity < 1 or host_capacity < 0:
            raise ValueError(f"expected capacity >= 1 and host_capacity >= 0, found {capacity}, {host_capacity}")
        self.model = model
        self.roots = [Path(r).resolve() for r in roots]
        self.library = library
        self.capacity, self.host_capacity = capacity, host_capacity
        self.strict_base = strict_base
        self._lock = threading.RLock()
        self._names: dict[str, str] = {}            # public directory name -> key
        self._sources: dict[str, _Source] = {}      # key -> source
        self._pins: dict[str, int] = {}
        self._device: OrderedDict[str, None] = OrderedDict()   # LRU order, oldest first
        self._host: OrderedDict[str, _HostCopy] = OrderedDict()
        self._serial = itertools.count(1)
        self._fingerprints: dict[tuple, str] = {}   # (kind, modules_to_save) -> the base's fingerprint

    # ------------------------------------------------------------------ any thread
    def allow(self, root: str | os.PathLike) -> None:
        """Add a directory that adapters may be loaded from."""
        with self._lock:
            self.roots.append(Path(root).resolve())

    def register(self, name: str, path: str | os.PathLike, *, replace: bool = False) -> str:
        """Serve the adapter directory ``path`` as ``name``; returns its key. The directory and
        its tensor file must lie inside the roots; it is attached on first use."""
        _check_name(name)
        src = self._checked_dir(Path(path))
        man = read_manifest(src)
        tensors = (src / man["tensors"]["file"])
        if not _inside(tensors, self.roots):
            raise PathNotAllowed(f"{path}: its manifest names a tensor file outside the adapter directories")
        with self._lock:
            if name in self._names and not replace:
                raise ValueError(f"an adapter named {name!r} is already loaded")
            if name in self._names:
                self._retire(self._names.pop(name))
            key = f"{name}~{next(self._serial)}"
            self._sources[key] = _Source(name, src, man["tensors"]["sha256"])
            self._names[name] = key
        return key

    def _checked_dir(self, path: Path) -> Path:
        """``path`` (absolute, or relative to a root) as a real directory inside a root."""
        if not self.roots:
            raise PathNotAllowed("no adapter directories are configured (--adapter-dir); loading by path is off")
        candidates = [path] if path.is_absolute() else [r / path for r in self.roots]
        for c in candidates:
            if c.exists():
                if not _inside(c, self.roots):
                    raise PathNotAllowed(f"{path}: outside the adapter directories")
                if not c.is_dir():
                    raise FileNotFoundError(f"{path}: expected an adapter directory, found a file")
                return c.resolve()
        raise FileNotFoundError(f"{path}: no such adapter directory under the adapter directories")

    def unregister(self, name: str) -> None:
        """Stop serving ``name``; its key is dropped once the rows using it finish."""
        with self._lock:
            if name not in self._names:
                raise UnknownAdapter(f"no loaded adapter named {name!r}")
            self._retire(self._names.pop(name))

    def _retire(self, key: str) -> None:
        self._sources[key].retiring = True

    def resolve(self, model_name: str) -> Resolved:
        """The registered adapter ``model_name``, else the library entry (``name[@version]``)."""
        with self._lock:
            key = self._names.get(model_name)
            if key is not None:
                return Resolved(model_name, key)
        if self.library is None:
            raise UnknownAdapter(f"the model {model_name!r} does not exist")
        from ..library import LibraryError
        try:
            e = self.library.get(model_name)
        except LibraryError:
            raise UnknownAdapter(f"the model {model_name!r} does not exist") from None
        key = f"{e.name}@{e.version}"
        with self._lock:
            if key not in self._sources:
                self._sources[key] = _Source(key, Path(e.path), e.sha256, e.version, self._lineage(e))
        return Resolved(key, key)

    def _lineage(self, e) -> list[dict]:
        refs = {x.id: x.ref for x in self.library.list(name=None)} if e.lineage else {}
        return [{"parent": refs.get(pid, f"#{pid} (removed)"), "how": how} for pid, how in e.lineage]

    def acquire(self, model_name: str) -> Resolved:
        """:meth:`resolve` and pin the key, atomically against an unload."""
        with self._lock:
            r = self.resolve(model_name)
            if self._sources[r.key].retiring:
                raise UnknownAdapter(f"the model {model_name!r} is being unloaded")
            self._pins[r.key] = self._pins.get(r.key, 0) + 1
            return r

    def release(self, key: str) -> None:
        with self._lock:
            self._pins[key] -= 1
            if not self._pins[key]:
                del self._pins[key]

    def tiers(self) -> dict[str, int]:
        """How many adapters each tier holds (for /metrics)."""
        with self._lock:
            return {"device": len(self._device), "host": len(self._host),
                    "disk": len(self._sources) - len(self._device) - len(self._host)}

    def tier(self, key: str) -> str:
        with self._lock:
            return "device" if key in self._device else "host" if key in self._host else "disk"

    def listing(self) -> list[dict]:
        """Every servable adapter: registered names, library entries (each version and the
        newest under its bare name), with version, lineage and tier."""
        out = []
        with self._lock:
            for name, key in self._names.items():
                s = self._sources[key]
                out.append({"id": name, "root": str(s.path), "version": s.version, "lineage": s.lineage,
                            "tier": self.tier(key), "sha256": s.sha256})
        entries = self.library.list() if self.library is not None else []
        newest = {e.name: e for e in entries}               # listed by name, then version
        for e in entries:
            key = f"{e.name}@{e.version}"
            row = {"root": str(e.path), "version": e.version, "lineage": self._lineage(e),
                   "tier": self.tier(key), "sha256": e.sha256}
            if newest[e.name] is e and e.name not in self._names:
                out.append({"id": e.name, **row})
            out.append({"id": key, **row})
        return out

    # ------------------------------------------------------------------ the model's thread
    def ensure(self, key: str) -> None:
        """Attach ``key`` (from the host tier, else from disk) unless it is attached already."""
        with self._lock:
            if key in self._device:
                self._device.move_to_end(key)
                return
            src, host = self._sources[key], self._host.pop(key, None)
        if host is not None:
            attach_state(self.model, host.config, host.state, name=key, targets=host.targets,
                         full_targets=host.full_targets, activate=False, trainable=False, source=f"host copy of {key}")
        else:
            self._attach_from_disk(key, src)
        with self._lock:
            self._device[key] = None

    def _attach_from_disk(self, key: str, src: _Source) -> None:
        man = read_manifest(src.path)
        if man["tensors"]["sha256"] != src.sha256:
            raise ValueError(f"{src.path}: changed on disk since it was registered (tensor sha256 differs); "
                             f"load it again to serve the new version")
        if self.library is None or src.version is None:
            if not _inside(src.path / man["tensors"]["file"], self.roots):
                raise PathNotAllowed(f"{src.path}: its manifest names a tensor file outside the adapter directories")
        strict = self.strict_base and not self._same_base(man, src.path)
        load_adapter(self.model, src.path, name=key, strict_base=strict, activate=False, trainable=False)

    def _same_base(self, man: dict, path: Path) -> bool:
        """Check the manifest's whole-base fingerprint against one computed once per kind: the
        served base never changes, and recomputing it was 2/3 of a cold load (0.16 of 0.25 s on
        SmolLM2). False (let :func:`load_adapter` check) for the older per-target kind."""
        recorded = man["base_fingerprint"]
        if not recorded.startswith(("sample-v2:", "full-v2:")):
            return False
        full = tuple(sorted(p for p, info in man["targets"].items() if info.get("method") == "full"))
        cache_key = (recorded.partition(":")[0], full)
        if cache_key not in self._fingerprints:
            self._fingerprints[cache_key] = model_fingerprint(self.model, exclude=full,
                                                              full=recorded.startswith("full-"))
        if self._fingerprints[cache_key] != recorded:
            raise AdapterLoadError(f"{path}: trained on a different base model (fingerprint "
                                   f"{recorded[:20]}... vs the served base's {self._fingerprints[cache_key][:20]}...)")
        return True

    def trim(self) -> None:
        """Drop retired keys nobody uses, then evict unpinned adapters beyond the capacities."""
        with self._lock:
            for key in [k for k, s in self._sources.items() if s.retiring and not self._pins.get(k)]:
                if key in self._device:
                    self._detach(key)
                    del self._device[key]
                self._host.pop(key, None)
                del self._sources[key]
            spare = [k for k in self._device if not self._pins.get(k)]
            while len(self._device) > self.capacity and spare:
                self._to_host(spare.pop(0))
            while len(self._host) > self.host_capacity:
                self._host.popitem(last=False)

    def _to_host(self, key: str) -> None:
        ad = get_adapter(self.model, key)
        state = {k: v.detach().to("cpu", copy=True) for k, v in ad.state_dict().items()}
        full = [p for p, m in ad.targets.items() if m == "full"]
        copy = _HostCopy(ad.config, state, [p for p in ad.targets if p not in full], full)
        del ad
        self._detach(key)
        del self._device[key]
        if self.host_capacity:
            self._host[key] = copy

    def _detach(self, key: str) -> None:
        """Detach ``key``; core's ``detach`` also drops the batched paths' factor caches on the
        layers it touched, so the adapter's memory really goes (the unload test checks it)."""
        detach(self.model, key)

    def attached(self) -> list[str]:
        """Keys on the device, least recently used first."""
        with self._lock:
            return [k for k in self._device if k in attached(self.model)]


def _check_name(name: str) -> None:
    """Names become module-dict keys and metric labels: no dots, no '@' or '~' (reserved for
    versions and keys), no path separators."""
    bad = set(".@~/\\\0") & set(name)
    if not name or bad or name.strip() != name:
        raise ValueError(f"expected an adapter name without {sorted(bad) or 'surrounding spaces'}, found {name!r}")

