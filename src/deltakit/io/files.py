"""Atomic writes, output guards, crash recovery, checksums and JSON files
(tensors: :mod:`deltakit.io.tensors`).

Every file deltakit writes goes through :func:`atomic_write` (temp file in the same
directory, fsync, ``os.replace``) and every directory through :func:`atomic_dir` (built
under a temp name, then swapped in with one atomic ``renameat2(RENAME_EXCHANGE)``), so a
crash - kill -9 included - leaves either the old complete version or the new one, never
half of either and never nothing. Tensors are read from ``safetensors`` only, never pickle.

Temp names carry the writer's PID (``.NAME.PID.XXXXXXXX.tmp``, ``.NAME.old-PID-XXXXXXXX``),
so the next write to the same target removes what a killed writer left behind without
touching a live writer's work. No lock: two live writers of one target each publish a
complete version with an atomic swap and remove only their own temp names, so the last
swap wins and nothing is left over. (PIDs are per host: writers on two hosts of a shared
filesystem must not write the same target.)
"""
from __future__ import annotations

import contextlib
import ctypes
import errno
import functools
import hashlib
import json
import os
import re
import shutil
import sys
import tempfile
import time
from collections.abc import Iterable, Iterator, Mapping
from pathlib import Path

__all__ = [
    "DeltakitFileError",
    "OutputRefusedError",
    "OUTPUT_MARKER",
    "pid_alive",
    "atomic_write",
    "atomic_dir",
    "guard_output",
    "output_kind",
    "recover",
    "clean_debris",
    "write_json",
    "read_json",
    "save_tensors",
    "load_tensors",
    "sha256_file",
]

#: the file that makes a directory a complete deltakit output of a kind (written inside the
#: temp directory, so it exists iff the output is complete)
OUTPUT_MARKER = "deltakit.json"
OUTPUT_FORMAT = "deltakit.output"
#: kinds whose own manifest already says what they are (no marker file added)
_MANIFEST_KINDS = {"adapter": ("adapter.json", "deltakit.adapter")}
#: debris of an old deltakit (no PID in the name) is removed once this old
_LEGACY_DEBRIS_AGE = 3600.0


class DeltakitFileError(ValueError):
    """A file on disk is missing, corrupt, or not what was expected."""


class OutputRefusedError(DeltakitFileError):
    """An output path names something deltakit did not create, or one of the command's inputs."""


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


def _usual_modes_under(root: Path) -> None:
    """Every file and directory in a finished temp dir gets the mode a plain create would give.

    Libraries write private files: safetensors' ``save_file`` (so ``save_pretrained``) creates
    0600, which made a merged export's model.safetensors unreadable to the group while its
    config.json was 0644. Execute bits that were set stay set.
    """
    mask = _umask()
    for dirpath, _, filenames in os.walk(root):
        os.chmod(dirpath, 0o777 & ~mask)
        for name in filenames:
            p = os.path.join(dirpath, name)
            if not os.path.islink(p):
                os.chmod(p, (0o666 | (os.stat(p).st_mode & 0o111)) & ~mask)


# ----------------------------------------------------------------------------- temp names
_TMP_RE = re.compile(r"(\d+)\.[a-z0-9_]{8}\.tmp")  # .NAME.PID.XXXXXXXX.tmp
_OLD_RE = re.compile(r"old-(\d+)(?:-[a-z0-9_]{8})?")  # .NAME.old-PID[-XXXXXXXX]
_LEGACY_TMP_RE = re.compile(r"[a-z0-9_]{8}\.tmp")  # .NAME.XXXXXXXX.tmp (deltakit <= 0.x, no PID)


def _tmp_prefix(path: Path) -> str:
    return f".{path.name}.{os.getpid()}."


def pid_alive(pid: int) -> bool:
    """Whether process ``pid`` may still be writing (this process, an unknown one, or a live one)."""
    if pid == os.getpid() or os.name != "posix":  # (Windows' os.kill would terminate it: keep all)
        return True  # another thread of this process may be writing
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:  # a killed child its parent has not reaped yet is a zombie: as dead as it gets
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        return True


def _debris(path: Path) -> Iterator[tuple[Path, str, int | None]]:
    """Temp and moved-aside names of ``path`` in its directory: (entry, 'tmp' | 'old', owner PID)."""
    prefix = f".{path.name}."
    try:
        entries = list(os.scandir(path.parent))
    except FileNotFoundError:
        return
    for e in entries:
        if not e.name.startswith(prefix):
            continue
        rest = e.name[len(prefix):]
        if m := _TMP_RE.fullmatch(rest):
            yield Path(e.path), "tmp", int(m.group(1))
        elif m := _OLD_RE.fullmatch(rest):
            yield Path(e.path), "old", int(m.group(1))
        elif _LEGACY_TMP_RE.fullmatch(rest):
            yield Path(e.path), "tmp", None


def _remove(p: Path) -> None:
    """Delete a file or a directory tree. A moved-aside old version is renamed to a temp name
    first, so that a kill mid-delete never leaves a half-deleted tree under a name that
    :func:`recover` would put back."""
    if not p.is_dir() or p.is_symlink():
        with contextlib.suppress(FileNotFoundError):
            os.unlink(p)
        return
    if ".old-" in p.name:
        trash = Path(tempfile.mktemp(prefix=_tmp_prefix(_target_of(p)), suffix=".tmp", dir=p.parent))
        with contextlib.suppress(OSError):
            os.rename(p, trash)
            p = trash
    shutil.rmtree(p, ignore_errors=True)


def _target_of(debris: Path) -> Path:
    """``.NAME.old-PID-X`` -> ``NAME`` (the target a moved-aside directory belongs to)."""
    stem = debris.name[1:]
    return debris.with_name(stem[: stem.rindex(".old-")])


def clean_debris(path: str | os.PathLike) -> list[Path]:
    """Remove what killed writers of ``path`` left beside it; return what was removed.

    Only names whose owning process is dead go (a live writer's temp dir is its work in
    progress), plus PID-less temp names of an older deltakit once they are an hour old.
    A moved-aside old version is kept while ``path`` is absent: :func:`recover` needs it.
    """
    path = Path(path)
    removed = []
    for p, kind, pid in _debris(path):
        if pid is None:
            with contextlib.suppress(FileNotFoundError):
                if time.time() - p.lstat().st_mtime < _LEGACY_DEBRIS_AGE:
                    continue
        elif pid_alive(pid):
            continue
        if kind == "old" and not os.path.lexists(path):
            continue
        _remove(p)
        removed.append(p)
    return removed


def recover(path: str | os.PathLike) -> bool:
    """If ``path`` is absent but a dead writer moved its complete old version aside
    (``.NAME.old-PID``, the two-rename fallback killed between its renames), put it back.

    Returns True when it restored something. Called by every write and by adapter reads.
    """
    path = Path(path)
    if os.path.lexists(path):
        return False
    olds = [p for p, kind, pid in _debris(path) if kind == "old" and pid is not None and not pid_alive(pid)]
    for old in sorted(olds, key=lambda p: p.lstat().st_mtime, reverse=True):
        try:
            _rename_noreplace(old, path)
            return True
        except (FileExistsError, FileNotFoundError):
            return os.path.lexists(path)
    return False


# ----------------------------------------------------------------------------- renames
_AT_FDCWD = -100
_RENAME_NOREPLACE = 1
_RENAME_EXCHANGE = 2


@functools.cache
def _renameat2():
    """libc's ``renameat2`` (Linux, glibc >= 2.28), or None."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        fn = ctypes.CDLL(None, use_errno=True).renameat2
    except (OSError, AttributeError):
        return None
    fn.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    fn.restype = ctypes.c_int
    return fn


class _Unsupported(Exception):
    """renameat2 (or this flag of it) is unavailable here: use the two-rename fallback."""


def _rename2(src: Path, dst: Path, flags: int) -> None:
    fn = _renameat2()
    if fn is None:
        raise _Unsupported
    if fn(_AT_FDCWD, os.fsencode(src), _AT_FDCWD, os.fsencode(dst), flags) == 0:
        return
    err = ctypes.get_errno()
    if err in (errno.ENOSYS, errno.EINVAL, errno.EOPNOTSUPP):  # old kernel, or a filesystem (NFS...) without it
        raise _Unsupported
    raise OSError(err, os.strerror(err), str(src), None, str(dst))


def _rename_noreplace(src: Path, dst: Path) -> None:
    """Rename ``src`` to ``dst``; FileExistsError if ``dst`` exists (never replaces it)."""
    try:
        _rename2(src, dst, _RENAME_NOREPLACE)
    except _Unsupported:
        if os.path.lexists(dst):
            raise FileExistsError(errno.EEXIST, "exists", str(dst)) from None
        try:
            os.rename(src, dst)  # may replace an empty directory created meanwhile: nothing is lost
        except OSError as e:
            if e.errno in (errno.ENOTEMPTY, errno.EEXIST, errno.ENOTDIR, errno.EISDIR):
                raise FileExistsError(errno.EEXIST, "exists", str(dst)) from None
            raise


def _publish(tmp: Path, path: Path) -> None:
    """Make the complete directory ``tmp`` be ``path``, atomically; remove the old version.

    Linux: one ``renameat2(RENAME_EXCHANGE)`` swaps them (``path`` is never absent), then the
    old version, now under the temp name, is deleted. Elsewhere: ``path`` -> ``.NAME.old-PID-X``,
    ``tmp`` -> ``path``; a kill between the two leaves the old complete version, which the next
    write or read puts back (:func:`recover`). A writer that published meanwhile is swapped out.
    """
    while True:
        try:
            _rename2(tmp, path, _RENAME_EXCHANGE)
        except FileNotFoundError:  # no old version
            with contextlib.suppress(FileExistsError):
                _rename_noreplace(tmp, path)
                return
        except _Unsupported:
            if _two_renames(tmp, path):
                return
        else:
            _remove(tmp)  # the old version, swapped under the temp name
            return


def _two_renames(tmp: Path, path: Path) -> bool:
    old = Path(tempfile.mktemp(prefix=f".{path.name}.old-{os.getpid()}-", suffix="", dir=path.parent))
    moved = False
    with contextlib.suppress(FileNotFoundError):
        os.rename(path, old)
        moved = True
    try:
        _rename_noreplace(tmp, path)
    except FileExistsError:  # another writer published between our renames: go round again
        if moved:
            _remove(old)
        return False
    if moved:
        _remove(old)
    return True


# ----------------------------------------------------------------------------- atomic writes
@contextlib.contextmanager
def atomic_write(path: str | os.PathLike, mode: str = "wb") -> Iterator:
    """Open a temp file next to ``path``; on success fsync and rename it over ``path``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    clean_debris(path)
    fd, tmp = tempfile.mkstemp(prefix=_tmp_prefix(path), suffix=".tmp", dir=path.parent)
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
def atomic_dir(path: str | os.PathLike, *, kind: str | None = None) -> Iterator[Path]:
    """Build a directory under a temp name; swap it in as ``path`` only if the block succeeds.

    An existing ``path`` is replaced atomically (see :func:`_publish`): a kill at any moment
    leaves the old complete version or the new one. ``kind`` (``"adapter"``, ``"merged"``,
    ``"peft"``...) marks the output as a complete deltakit output of that kind (the
    :data:`OUTPUT_MARKER` file, written last inside the temp dir; adapters carry their own
    manifest instead), so that ``--overwrite`` knows it may replace it. What may be replaced
    is the caller's policy (:func:`guard_output` for commands). Leftovers of killed writers
    of ``path`` are removed first (:func:`clean_debris`).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    recover(path)
    clean_debris(path)
    tmp = Path(tempfile.mkdtemp(prefix=_tmp_prefix(path), suffix=".tmp", dir=path.parent))
    try:
        yield tmp
        if kind is not None and kind not in _MANIFEST_KINDS:
            # a plain write: the temp dir is the atomic unit (and fsync stays the caller's choice)
            (tmp / OUTPUT_MARKER).write_text(json.dumps({"format": OUTPUT_FORMAT, "kind": kind}) + "\n")
        _usual_modes_under(tmp)
        _publish(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


# ----------------------------------------------------------------------------- output guard
def _json_field(path: Path, key: str):
    try:
        with open(path) as f:
            obj = json.load(f)
    except (OSError, ValueError):
        return None
    return obj.get(key) if isinstance(obj, dict) else None


def output_kind(path: str | os.PathLike) -> str | None:
    """What deltakit output ``path`` is (``"adapter"``, ``"merged"``, ``"peft"``...), or None
    when it is not a directory deltakit completed."""
    path = Path(path)
    if not path.is_dir():
        return None
    for kind, (manifest, fmt) in _MANIFEST_KINDS.items():
        if _json_field(path / manifest, "format") == fmt:
            return kind
    if _json_field(path / OUTPUT_MARKER, "format") == OUTPUT_FORMAT:
        kind = _json_field(path / OUTPUT_MARKER, "kind")
        return kind if isinstance(kind, str) else None
    return None


def _check_replaceable(path: Path, kind: str, overwrite: bool) -> None:
    if not os.path.lexists(path):
        return
    if path.is_dir() and not path.is_symlink() and not any(path.iterdir()):
        return  # an empty directory holds nothing to lose
    found = output_kind(path)
    what = f"a deltakit {found} output" if found else ("a file" if not path.is_dir() else
                                                        "a directory deltakit did not write")
    if not overwrite:
        raise OutputRefusedError(f"{path} exists and is not empty ({what}); choose another output, "
                                 f"or pass --overwrite to replace a deltakit {kind} output")
    if found != kind:
        raise OutputRefusedError(f"refusing to replace {path}: expected a deltakit {kind} output, "
                                 f"found {what}")


def guard_output(path: str | os.PathLike, kind: str, *, inputs: Iterable[str | os.PathLike] = (),
                 overwrite: bool = False) -> Path:
    """Check, before any work, that a command may write its ``kind`` output to ``path``.

    Refused (:class:`OutputRefusedError`): ``path`` is one of ``inputs`` or contains one
    (``-o`` onto the adapter being exported, onto the data, onto ``$PWD`` holding them);
    ``path`` exists and is not empty, unless ``overwrite`` and it is a complete deltakit
    output of the same ``kind`` (anything else is refused even then). Inputs that are not
    local paths (hub ids) are ignored. Returns ``path``.
    """
    path = Path(path)
    recover(path)
    target = path.resolve()
    for inp in inputs:
        src = Path(inp).resolve()
        if not src.exists():
            continue
        if src == target or target in src.parents:
            rel = "is" if src == target else "contains"
            raise OutputRefusedError(f"refusing to write the {kind} output to {path}: it {rel} the input {inp}")
    _check_replaceable(path, kind, overwrite)
    return path


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
