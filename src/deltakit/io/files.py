"""Atomic writes, checksums and JSON files (tensors: :mod:`deltakit.io.tensors`).

Every file deltakit writes goes through :func:`atomic_write` (temp file in the same
directory, fsync, ``os.replace``), so a crash leaves either the old file or the new
one, never half of either. Tensors are read from ``safetensors`` only, never pickle.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

__all__ = [
    "DeltakitFileError",
    "atomic_write",
    "atomic_dir",
    "write_json",
    "read_json",
    "save_tensors",
    "load_tensors",
    "sha256_file",
]


class DeltakitFileError(ValueError):
    """A file on disk is missing, corrupt, or not what was expected."""


def _umask() -> int:
    try:  # Linux: read it without changing it (os.umask(0) would race with other threads' creates)
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def _usual_mode(path: str | os.PathLike, fd: int | None = None, directory: bool = False) -> None:
    """Give a mkstemp / mkdtemp result the mode a plain ``open`` / ``mkdir`` would have.

    They create 0600 / 0700 (private to the owner), so without this every adapter, checkpoint
    and JSON written atomically would be unreadable to the user's group and others.
    """
    mode = (0o777 if directory else 0o666) & ~_umask()
    if fd is not None and hasattr(os, "fchmod"):
        os.fchmod(fd, mode)
    else:
        os.chmod(path, mode)


@contextlib.contextmanager
def atomic_write(path: str | os.PathLike, mode: str = "wb") -> Iterator:
    """Open a temp file next to ``path``; on success fsync and rename it over ``path``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        _usual_mode(tmp, fd)
        with os.fdopen(fd, mode) as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


@contextlib.contextmanager
def atomic_dir(path: str | os.PathLike) -> Iterator[Path]:
    """Build a directory under a temp name; rename it to ``path`` only if the block succeeds.

    An existing ``path`` is replaced (moved aside, then removed) only after the new
    directory is complete.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent))
    try:
        _usual_mode(tmp, directory=True)
        yield tmp
        old = None
        if path.exists():
            old = path.with_name(f".{path.name}.old-{os.getpid()}")
            os.replace(path, old)
        os.replace(tmp, path)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def write_json(path: str | os.PathLike, obj) -> None:
    with atomic_write(path, "w") as f:
        json.dump(obj, f, indent=2, sort_keys=True)
        f.write("\n")


def read_json(path: str | os.PathLike) -> dict:
    path = Path(path)
    if not path.is_file():
        raise DeltakitFileError(f"expected a JSON file at {path}, found nothing")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise DeltakitFileError(f"{path} is not valid JSON: {e}") from None


def sha256_file(path: str | os.PathLike, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def __getattr__(name: str):
    # save_tensors / load_tensors live in the one safetensors layer (deltakit.io.tensors),
    # which imports this module; resolving them on first use keeps the old import path
    # without an import cycle.
    if name in ("save_tensors", "load_tensors"):
        from . import tensors
        return getattr(tensors, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
