"""Which adapters the server knows, which are attached to the model, and which wait in host memory.

Three tiers, as S-LoRA / LoRAX keep them:

* **device**: attached to the model (on its device), at most ``capacity`` of them, least
  recently used evicted first;
* **host**: detached, their tensors kept as CPU state dicts (a compressed one: its codec
  values) (``host_capacity`` of them), so coming back costs an attach, not a file read and a
  sha256;
* **disk**: the adapter directory or the library entry, read on first use.

Two kinds at rest: an adapter directory (``adapter.json``), or a compressed task vector as
``deltakit compress`` writes it (a task-vector directory; its host copy holds the decoded codec
values, compact codecs staying compact, and it is attached with
:func:`deltakit.compress.apply.attach_compressed`, an ordinary adapter for mixed batches). The
kind is read from the directory's manifest; the path rules are the same for both.

Prefetch (:meth:`prefetch`): the engine names the adapters of the next queued requests, and
those only on disk are read into host copies by one background thread (file read, sha256,
decode; nothing touches the model), so their admission costs the attach only. The checks that
need the model (targets, base fingerprint) run at attach, on the scheduler thread. Policy:
prefetched copies count against ``host_capacity`` from the moment their read starts; a
prefetch takes a free host slot, else the slot of the least recently used host copy that no
request in the look-ahead window wants and no request pins (queued demand outranks past use;
copies requests are waiting for are never evicted by a prefetch), else it waits. A read that
fails is recorded and the first admission of that adapter raises the error (that request
fails; nothing else does); it is not retried until then.

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
configured roots, and so must the tensor file(s) its manifest names.

Threads: :meth:`resolve`, :meth:`acquire`, :meth:`release`, :meth:`register`, :meth:`unregister`,
:meth:`prefetch` and :meth:`listing` may run on any thread (one lock guards the tables); the
prefetch thread only reads files and fills the host table; :meth:`ensure` and :meth:`trim`
attach and detach, so only the thread that owns the model (the scheduler) calls them.
"""
from __future__ import annotations

import hashlib
import itertools
import os
import threading
from collections import Counter, OrderedDict
from collections.abc import Iterable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from concurrent.futures import wait as wait_for
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from torch import nn

from ..core.adapter import adapters as attached
from ..core.adapter import detach, get_adapter
from ..core.fingerprint import fingerprint_matches, model_fingerprint
from ..core.load import AdapterLoadError, attach_state
from ..core.registry import ConfigError, get_method
from ..io.adapter_files import MANIFEST, _check_targets, _read_checked, read_manifest
from ..io.tensors import LazyCheckpoint

__all__ = ["Residency", "UnknownAdapter", "PathNotAllowed", "Resolved"]

Kind = Literal["adapter", "compressed"]


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
    """Where a key's tensors come from and what /v1/models says about it. ``sha256``: the
    adapter's tensor-file hash, or for a compressed one the hash of its manifest (which holds
    every entry's sha256), so a file changed since registration is refused."""

    public: str
    path: Path
    sha256: str
    version: int | None = None
    lineage: list[dict] = field(default_factory=list)
    retiring: bool = False
    kind: Kind = "adapter"
    codec: str | None = None
    stored_bytes: int | None = None


@dataclass
class _HostCopy:
    """A detached adapter in host memory. ``state``: an adapter's state dict, or a compressed
    one's ``{entry: codec value}``. ``unchecked``: the manifest (header) of a copy read from
    disk, whose checks against the model still have to run at attach; None once they have."""

    kind: Kind
    config: object
    state: dict
    targets: list[str] = field(default_factory=list)
    full_targets: list[str] = field(default_factory=list)
    unchecked: dict | None = None
    prefetched: bool = False


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
        self._fingerprints: dict[tuple, str] = {}   # (kind, excluded paths) -> the base's fingerprint
        self._inflight: dict[str, Future] = {}      # key -> its prefetch read (holds a host slot)
        self._failed: dict[str, BaseException] = {}  # key -> why its prefetch read failed
        self._wanted: set[str] = set()              # keys the last look-ahead window named
        self._pool: ThreadPoolExecutor | None = None
        self._closed = False
        #: admissions by where the adapter was found: device, host (an evicted copy), prefetched
        #: (a prefetched copy, ready), waited (its prefetch still reading), disk (read at admission)
        self.loads: Counter[str] = Counter()
        #: prefetch reads: started, failed, dropped (unloaded or attached before the read ended),
        #: evicted (a prefetched copy pushed out of the host tier before use)
        self.prefetches: Counter[str] = Counter()

    # ------------------------------------------------------------------ any thread
    def allow(self, root: str | os.PathLike) -> None:
        """Add a directory that adapters may be loaded from."""
        with self._lock:
            self.roots.append(Path(root).resolve())

    def register(self, name: str, path: str | os.PathLike, *, replace: bool = False) -> str:
        """Serve the adapter directory (or compressed task-vector directory) ``path`` as ``name``;
        returns its key. The directory and the tensor files it names must lie inside the roots;
        it is attached on first use."""
        _check_name(name)
        src = self._checked_dir(Path(path))
        source = self._adapter_source(name, src) if (src / MANIFEST).is_file() else self._compressed_source(name, src)
        with self._lock:
            if name in self._names and not replace:
                raise ValueError(f"an adapter named {name!r} is already loaded")
            if name in self._names:
                self._retire(self._names.pop(name))
            key = f"{name}~{next(self._serial)}"
            self._sources[key] = source
            self._names[name] = key
        return key

    def _adapter_source(self, name: str, src: Path) -> _Source:
        man = read_manifest(src)
        tensors = src / man["tensors"]["file"]
        if not _inside(tensors, self.roots):
            raise PathNotAllowed(f"{src}: its manifest names a tensor file outside the adapter directories")
        size = tensors.stat().st_size if tensors.is_file() else None
        return _Source(name, src, man["tensors"]["sha256"], stored_bytes=size)

    def _compressed_source(self, name: str, src: Path) -> _Source:
        """A compressed task vector: its files checked against the roots, its codecs and stored
        bytes read from the manifest (no tensor data is read here)."""
        from ..compress.api import is_task_vector
        from ..compress.container import load_compressed
        if not is_task_vector(src):
            raise FileNotFoundError(f"{src}: expected an adapter directory ({MANIFEST}) or a compressed task "
                                    f"vector (deltakit compress), found neither")
        digest = self._checked_files(src)
        f = load_compressed(src)
        labels = sorted({r.label for r in f.records.values()})
        return _Source(name, src, digest, kind="compressed", codec=", ".join(labels), stored_bytes=f.total_bytes)

    def _checked_files(self, src: Path) -> str:
        """The sha256 of a compressed task vector's manifest, once every file its index names is
        known to lie inside the roots (headers only are read). The manifest holds each entry's
        sha256, so any change to the stored values changes this digest."""
        ck = LazyCheckpoint(src)
        if any(not _inside(ck.info(k).file, self.roots) for k in ck.keys()):
            raise PathNotAllowed(f"{src}: its index names a tensor file outside the adapter directories")
        meta = ck.metadata
        return hashlib.sha256((meta.get("entries", "") + "\0" + meta.get("compressed", "")).encode()).hexdigest()

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
        """How many adapters each tier holds (for /metrics); a prefetch still reading counts as disk."""
        with self._lock:
            return {"device": len(self._device), "host": len(self._host),
                    "disk": len(self._sources) - len(self._device) - len(self._host)}

    def tiers_by_kind(self) -> dict[tuple[str, str], int]:
        """``(tier, kind) -> count``: the same tiers split into adapters and compressed ones."""
        with self._lock:
            out: Counter[tuple[str, str]] = Counter()
            for key, s in self._sources.items():
                out[(self.tier(key), s.kind)] += 1
            return dict(out)

    def tier(self, key: str) -> str:
        with self._lock:
            return "device" if key in self._device else "host" if key in self._host else "disk"

    def listing(self) -> list[dict]:
        """Every servable adapter: registered names, library entries (each version and the
        newest under its bare name), with version, lineage, tier, kind, codec and stored bytes."""
        out = []
        with self._lock:
            for name, key in self._names.items():
                s = self._sources[key]
                out.append({"id": name, "root": str(s.path), "version": s.version, "lineage": s.lineage,
                            "tier": self.tier(key), "sha256": s.sha256, "kind": s.kind, "codec": s.codec,
                            "stored_bytes": s.stored_bytes})
        entries = self.library.list() if self.library is not None else []
        newest = {e.name: e for e in entries}               # listed by name, then version
        for e in entries:
            key = f"{e.name}@{e.version}"
            row = {"root": str(e.path), "version": e.version, "lineage": self._lineage(e),
                   "tier": self.tier(key), "sha256": e.sha256, "kind": "adapter", "codec": None,
                   "stored_bytes": None}
            if newest[e.name] is e and e.name not in self._names:
                out.append({"id": e.name, **row})
            out.append({"id": key, **row})
        return out

    # ------------------------------------------------------------------ prefetch (any thread)
    def prefetch(self, keys: Iterable[str]) -> dict[str, Future]:
        """Start reading into host memory the adapters ``keys`` name (the look-ahead window,
        in queue order) that are only on disk; returns the reads started (key -> future, done
        once the copy is installed or the failure recorded). See the module docstring for the
        capacity policy."""
        with self._lock:
            want = [k for k in dict.fromkeys(keys) if k in self._sources]
            self._wanted = set(want)
            started: dict[str, Future] = {}
            for key in want:
                if self._closed or not self._fetchable(key):
                    continue
                if not self._make_room():
                    break
                started[key] = self._inflight[key] = self._executor().submit(self._fetch, key, self._sources[key])
                self.prefetches["started"] += 1
            return started

    def _fetchable(self, key: str) -> bool:
        return not (key in self._device or key in self._host or key in self._inflight or key in self._failed
                    or self._sources[key].retiring)

    def _make_room(self) -> bool:
        """A host slot for one more read: a free one, or the LRU copy nobody waits for."""
        if len(self._host) + len(self._inflight) < self.host_capacity:
            return True
        spare = [k for k in self._host if k not in self._wanted and not self._pins.get(k)]
        if not spare:
            return False
        self._evict_host(spare[0])
        return True

    def _evict_host(self, key: str) -> None:
        if self._host.pop(key).prefetched:
            self.prefetches["evicted"] += 1

    def _executor(self) -> ThreadPoolExecutor:
        if self._pool is None:  # one reader: file reads in turn, the other core left to the scheduler
            self._pool = ThreadPoolExecutor(1, thread_name_prefix="deltakit-prefetch")
        return self._pool

    def _fetch(self, key: str, src: _Source) -> None:
        """The prefetch thread: read ``key`` into a host copy (never touching the model), then
        install it, unless it was unloaded or attached meanwhile."""
        try:
            copy = self._read(src)
        except BaseException as e:
            with self._lock:
                self._inflight.pop(key, None)
                self._failed[key] = e
                self.prefetches["failed"] += 1
            raise
        with self._lock:
            self._inflight.pop(key, None)
            if key not in self._sources or self._sources[key].retiring or key in self._device:
                self.prefetches["dropped"] += 1
                return
            copy.prefetched = True
            self._host[key] = copy

    def loading(self, key: str) -> bool:
        """Whether a prefetch read of ``key`` is under way (admitting it now would wait for it)."""
        with self._lock:
            return key in self._inflight

    def close(self) -> None:
        """Stop prefetching: reads not started are cancelled, a running one finishes."""
        with self._lock:
            self._closed = True
            pool, self._pool = self._pool, None
        if pool is not None:
            pool.shutdown(wait=True, cancel_futures=True)
        with self._lock:
            self._inflight.clear()

    # ------------------------------------------------------------------ reading (any thread)
    def _read(self, src: _Source) -> _HostCopy:
        """``src``'s tensors from disk into host memory, checked against its files (not the model)."""
        if src.kind == "compressed":
            return self._read_compressed(src)
        man = read_manifest(src.path)
        if man["tensors"]["sha256"] != src.sha256:
            raise ValueError(f"{src.path}: changed on disk since it was registered (tensor sha256 differs); "
                             f"load it again to serve the new version")
        tensor_file = src.path / man["tensors"]["file"]
        if (self.library is None or src.version is None) and not _inside(tensor_file, self.roots):
            raise PathNotAllowed(f"{src.path}: its manifest names a tensor file outside the adapter directories")
        spec = get_method(man["method"])
        try:
            config = spec.config.from_dict(man["config"])
        except (TypeError, ConfigError) as e:
            raise AdapterLoadError(f"{src.path / MANIFEST}: bad config for method {spec.name!r}: {e}") from None
        state = _read_checked(tensor_file, man["tensors"]["sha256"])
        full = [p for p, info in man["targets"].items() if info.get("method") == "full"]
        return _HostCopy("adapter", config, state, [p for p in man["targets"] if p not in full], full,
                         unchecked=man)

    def _read_compressed(self, src: _Source) -> _HostCopy:
        """Every entry decoded (its sha256 and shape checked) into its codec value."""
        from ..compress.container import load_compressed
        if self._checked_files(src.path) != src.sha256:
            raise ValueError(f"{src.path}: changed on disk since it was registered (manifest sha256 differs); "
                             f"load it again to serve the new version")
        f = load_compressed(src.path)
        return _HostCopy("compressed", None, {n: f.get(n) for n in f.records}, unchecked=dict(f.header))

    # ------------------------------------------------------------------ the model's thread
    def ensure(self, key: str) -> None:
        """Attach ``key`` unless it is attached already: from its host copy (waiting for its
        prefetch read if one is under way), else read from disk here."""
        with self._lock:
            if key in self._device:
                self._device.move_to_end(key)
                self.loads["device"] += 1
                return
            src, fut = self._sources[key], self._inflight.get(key)
        if fut is not None:
            wait_for([fut])
        with self._lock:
            self._inflight.pop(key, None)  # a read cancelled by close() leaves its entry
            host, failed = self._host.pop(key, None), self._failed.pop(key, None)
        if failed is not None:
            raise failed
        where = "disk" if host is None else "waited" if fut is not None else "prefetched" if host.prefetched else "host"
        self._attach(key, src, host if host is not None else self._read(src))
        with self._lock:
            self._device[key] = None
            self.loads[where] += 1

    def _attach(self, key: str, src: _Source, copy: _HostCopy) -> None:
        if copy.unchecked is not None:
            self._check_against_model(src, copy)
        if copy.kind == "compressed":
            from ..compress.apply import attach_compressed
            from ..taskvec import TaskVector
            attach_compressed(self.model, TaskVector.from_mapping(copy.state), name=key, activate=False)
            return
        attach_state(self.model, copy.config, copy.state, name=key, targets=copy.targets,
                     full_targets=copy.full_targets, activate=False, trainable=False,
                     source=f"{'host copy of ' if copy.unchecked is None else ''}{src.path}")

    def _check_against_model(self, src: _Source, copy: _HostCopy) -> None:
        """What a file read cannot check alone: the targets exist with their shapes, and the base
        is the one the delta was made against (unless ``strict_base`` is off)."""
        man = copy.unchecked
        if copy.kind == "compressed":
            recorded = man.get("base_fingerprint")
            if self.strict_base and recorded is not None:
                self._same_base(recorded, sorted(man.get("base_exclude") or []), src.path)
            return
        paths, full = _check_targets(self.model, man, src.path)
        if self.strict_base and not self._same_base(man["base_fingerprint"], sorted(full), src.path):
            same, now = fingerprint_matches(self.model, man["base_fingerprint"], targets=paths, exclude=full)
            if not same:
                raise AdapterLoadError(
                    f"base model differs from the one the adapter was trained on (fingerprint {now[:20]}... vs "
                    f"{man['base_fingerprint'][:20]}...); pass strict_base=False (CLI: --no-strict-base) to load "
                    f"anyway")

    def _same_base(self, recorded: str, exclude: list[str], path: Path) -> bool:
        """Check a whole-base fingerprint against one computed once per kind: the served base
        never changes, and recomputing it was 2/3 of a cold load (0.16 of 0.25 s on SmolLM2).
        False (the caller checks per target) for the older per-target kind."""
        if not recorded.startswith(("sample-v2:", "full-v2:")):
            return False
        cache_key = (recorded.partition(":")[0], tuple(exclude))
        if cache_key not in self._fingerprints:
            self._fingerprints[cache_key] = model_fingerprint(self.model, exclude=exclude,
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
                self._failed.pop(key, None)
                del self._sources[key]
            spare = [k for k in self._device if not self._pins.get(k)]
            while len(self._device) > self.capacity and spare:
                self._to_host(spare.pop(0))
            while self._host and len(self._host) + len(self._inflight) > self.host_capacity:
                unwanted = [k for k in self._host if k not in self._wanted]
                self._evict_host(unwanted[0] if unwanted else next(iter(self._host)))

    def _to_host(self, key: str) -> None:
        ad = get_adapter(self.model, key)
        if self._sources[key].kind == "compressed":  # the codec values themselves, shared, not copied
            copy = _HostCopy("compressed", None, {f"{p}.{k}": v for p, d in ad.deltas() for k, v in d.values.items()})
        else:
            state = {k: v.detach().to("cpu", copy=True) for k, v in ad.state_dict().items()}
            full = [p for p, m in ad.targets.items() if m == "full"]
            copy = _HostCopy("adapter", ad.config, state, [p for p in ad.targets if p not in full], full)
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
