"""``AdapterLibrary.verify``: every stored file re-hashed against the index; unused files found."""
from __future__ import annotations

from typing import TYPE_CHECKING

from ..io.adapter_files import MANIFEST
from ..io.files import DeltakitFileError, read_json, sha256_file
from . import _store

if TYPE_CHECKING:
    from .library import AdapterLibrary, VerifyReport

__all__ = ["verify"]


def verify(lib: AdapterLibrary, *, clean: bool) -> VerifyReport:
    """Call with the writer lock held (no add or remove is half-way meanwhile)."""
    from .library import VerifyReport

    report = VerifyReport()
    status = lib.index.integrity()
    if status != "ok":
        report.corrupt.append(f"{lib.layout.index}: SQLite integrity check: {status}")
    entries = lib.index.entries()
    seen: dict[str, list[str]] = {}
    for e in entries:
        report.checked += 1
        if e.sha256 not in seen:
            seen[e.sha256] = _check_object(lib, e.sha256, e.manifest["tensors"]["file"])
        for problem in seen[e.sha256]:
            _file(report, problem, e.ref)
        rt = lib.layout.routing_file(e.routing_sha256)
        if not rt.is_file():
            report.missing.append(f"{e.ref}: {rt} is missing")
        elif sha256_file(rt) != e.routing_sha256:
            report.corrupt.append(f"{e.ref}: {rt}: sha256 does not match the index")
    _orphans(lib, report, {e.sha256 for e in entries}, {e.routing_sha256 for e in entries}, clean)
    return report


def _file(report: VerifyReport, problem: str, ref: str) -> None:
    kind, _, text = problem.partition(":")
    (report.missing if kind == "missing" else report.corrupt).append(f"{ref}: {text.strip()}")


def _check_object(lib: AdapterLibrary, sha: str, tensor_file: str) -> list[str]:
    """Problems of one stored object, as ``"missing: ..."`` / ``"corrupt: ..."`` strings."""
    obj = lib.layout.object(sha)
    f, m = obj / tensor_file, obj / MANIFEST
    if not f.is_file():
        return [f"missing: {f} is missing"]
    out = []
    if sha256_file(f) != sha:
        out.append(f"corrupt: {f}: sha256 does not match the index")
    try:
        recorded = read_json(m)["tensors"]["sha256"]
    except (DeltakitFileError, KeyError, TypeError) as e:
        return out + [f"{'missing' if not m.is_file() else 'corrupt'}: {m}: {e}"]
    if recorded != sha:
        out.append(f"corrupt: {m}: records tensor sha256 {str(recorded)[:12]}..., the index {sha[:12]}...")
    return out


def _orphans(lib: AdapterLibrary, report: VerifyReport, objects: set[str], routing: set[str], clean: bool) -> None:
    found = _store.scan(lib.layout)
    unused = ([lib.layout.object(s) for s in sorted(found.objects - objects)]
              + [lib.layout.routing_file(s) for s in sorted(found.routing - routing)]
              + found.stale_tmp + found.stray)
    for p in unused:
        if clean:
            _store.remove_path(p)
            report.cleaned.append(str(p))
        else:
            report.orphans.append(f"{p} is not used by any entry")
