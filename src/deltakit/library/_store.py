"""The library's files: the writer lock, staging, publishing by rename, hashing and the scan
``verify`` uses (no SQL, no tensors).

Layout under the library root::

    library.sqlite            the index (WAL)
    lock                      writers take fcntl.flock on it
    objects/<sha256>/         adapter.safetensors + adapter.json; sha256 of adapter.safetensors
    routing/<sha256>.safetensors   routing data, named by the sha256 of its own bytes
    tmp/<pid>.<random>/       an add's staging area (removed when the add ends)

Files are written in ``tmp/``, fsynced, then renamed into place (same filesystem, so the rename
is atomic), and only then is the index row inserted: a crash at any point leaves at worst files
no entry refers to, which :func:`scan` finds and ``verify(clean=True)`` removes. The lock is
``fcntl.flock`` (Linux / macOS): ``filelock`` is not a declared dependency of deltakit.
"""
from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from ..io.files import pid_alive, sha256_file

__all__ = ["Layout", "writer_lock", "staging", "fsync_tree", "publish", "Scan", "scan"]


@dataclass(frozen=True)
class Layout:
    root: Path

    @property
    def index(self) -> Path:
        return self.root / "library.sqlite"

    @property
    def lock(self) -> Path:
        return self.root / "lock"

    @property
    def objects(self) -> Path:
        return self.root / "objects"

    @property
    def routing(self) -> Path:
        return self.root / "routing"

    @property
    def tmp(self) -> Path:
        return self.root / "tmp"

    def object(self, sha: str) -> Path:
        return self.objects / sha

    def routing_file(self, sha: str) -> Path:
        return self.routing / f"{sha}.safetensors"

    def make(self) -> None:
        for d in (self.objects, self.routing, self.tmp):
            d.mkdir(parents=True, exist_ok=True)


@contextlib.contextmanager
def writer_lock(layout: Layout) -> Iterator[None]:
    """Exclusive across processes (and threads: each call opens its own descriptor)."""
    try:
        import fcntl
    except ImportError:  # pragma: no cover - Windows
        raise OSError("the adapter library needs fcntl.flock (Linux or macOS)") from None
    with open(layout.lock, "a+b") as f:
        fcntl.flock(f.fileno(), fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f.fileno(), fcntl.LOCK_UN)


@contextlib.contextmanager
def staging(layout: Layout) -> Iterator[Path]:
    """A private directory under ``tmp/`` named by this PID (so a scan can tell a live add's
    work from a dead one's); removed with whatever is left in it."""
    d = Path(tempfile.mkdtemp(prefix=f"{os.getpid()}.", dir=layout.tmp))
    try:
        yield d
    finally:
        shutil.rmtree(d, ignore_errors=True)


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_tree(path: Path) -> None:
    """fsync a file, or every file of a directory and the directory itself, so that the rename
    that publishes it never exposes data still in the page cache only."""
    if path.is_dir():
        for p in path.iterdir():
            _fsync(p)
    _fsync(path)


def publish(src: Path, dst: Path) -> bool:
    """Rename the fsynced ``src`` to ``dst`` unless ``dst`` exists (same content: its name is
    its hash). Returns True when this call created ``dst``. Call under the writer lock."""
    if dst.exists():
        return False
    fsync_tree(src)
    os.rename(src, dst)
    _fsync(dst.parent)
    return True


def _pid_of(name: str) -> int | None:
    head = name.split(".", 1)[0]
    return int(head) if head.isdigit() else None


@dataclass
class Scan:
    """What is on disk: object and routing hashes by their names, and dead adds' staging dirs."""

    objects: set[str]
    routing: set[str]
    stale_tmp: list[Path]
    stray: list[Path]


def scan(layout: Layout) -> Scan:
    objects, routing, stray = set(), set(), []
    for p in layout.objects.iterdir() if layout.objects.is_dir() else ():
        (objects.add(p.name) if p.is_dir() and len(p.name) == 64 else stray.append(p))
    for p in layout.routing.iterdir() if layout.routing.is_dir() else ():
        name = p.name.removesuffix(".safetensors")
        (routing.add(name) if p.is_file() and len(name) == 64 and name != p.name else stray.append(p))
    stale = [p for p in (layout.tmp.iterdir() if layout.tmp.is_dir() else ()) if (pid := _pid_of(p.name)) is None or not pid_alive(pid)]
    return Scan(objects, routing, stale, stray)


def remove_path(p: Path) -> None:
    if p.is_dir() and not p.is_symlink():
        shutil.rmtree(p, ignore_errors=True)
    else:
        with contextlib.suppress(FileNotFoundError):
            p.unlink()


def hash_object(obj: Path, tensor_file: str) -> str | None:
    """sha256 of an object's tensor file, or None when it is missing."""
    f = obj / tensor_file
    return sha256_file(f) if f.is_file() else None
