"""``deltakit inspect ADAPTER``: what an adapter directory holds, checked against the disk.

Exits non-zero (after printing everything) when the tensor file's sha256 differs from the
manifest, a tensor holds NaN / inf, or the method is not registered here.
"""
from __future__ import annotations

import json
from pathlib import Path

__all__ = ["add_parser", "run", "nonfinite_tensors"]

REQUIRED = ("method", "kind", "config", "targets", "tensors", "parameters", "base_fingerprint")


def add_parser(sub) -> None:
    p = sub.add_parser("inspect", help="describe a saved adapter or a compressed delta",
                       description="Show an adapter directory's method, config, targets, parameter counts, "
                                   "bytes on disk, training record and base fingerprint. Checks the tensor "
                                   "file's sha256, that every tensor is finite and that the method is known "
                                   "(exit 1 otherwise). On a compressed delta (deltakit compress -o ...): per "
                                   "tensor codec, bits/param, bytes and ratio, totals, the base fingerprint; "
                                   "every entry's sha256 is checked.")
    p.add_argument("adapter", help="adapter directory (adapter.json + adapter.safetensors), or a compressed-delta "
                                   "/ task-vector directory")
    p.add_argument("--json", action="store_true", help="print the manifest (plus the checks) as JSON")
    p.set_defaults(func=run)


def nonfinite_tensors(tensor_file: Path) -> list[str]:
    """Names of the floating tensors in ``tensor_file`` that hold NaN or inf (file order)."""
    import torch

    from ..io.tensors import load_tensors

    return [k for k, v in load_tensors(tensor_file).items()
            if v.is_floating_point() and not bool(torch.isfinite(v).all())]


def _checks(path: Path, man: dict) -> dict:
    """What inspect verifies on the disk: size, sha256, finiteness, method."""
    from ..core.registry import methods
    from ..io.files import sha256_file

    f = path / man["tensors"]["file"]
    present = f.is_file()
    return {"file": str(f), "bytes_on_disk": f.stat().st_size if present else None,
            "sha256_ok": present and sha256_file(f) == man["tensors"].get("sha256"),
            "nonfinite": nonfinite_tensors(f) if present else [],
            "method_known": man["method"] in methods()}


def _print_text(path: Path, man: dict, chk: dict) -> None:
    targets = man["targets"]
    by_method: dict[str, int] = {}
    for t in targets.values():
        by_method[t["method"]] = by_method.get(t["method"], 0) + 1
    cfg = {k: v for k, v in man["config"].items() if v not in (None, [], ())}
    known = "" if chk["method_known"] else "  (NOT REGISTERED in this deltakit)"
    print(f"adapter      {path}")
    print(f"method       {man['method']} ({man['kind']} delta){known}")
    print(f"config       {json.dumps(cfg)}")
    print(f"targets      {len(targets)} ({', '.join(f'{n} {m}' for m, n in by_method.items())})")
    for name in list(targets)[:6]:
        print(f"               {name}  [{targets[name]['type']}]")
    if len(targets) > 6:
        print(f"               ... {len(targets) - 6} more")
    print(f"parameters   {man['parameters']['trainable']:,} trainable / {man['parameters']['total']:,} stored")
    size = "missing" if chk["bytes_on_disk"] is None else f"{chk['bytes_on_disk']:,}"
    print(f"bytes        {size} on disk ({man['tensors'].get('count', '?')} tensors)")
    finite = "all finite" if not chk["nonfinite"] else \
        f"NON-FINITE: {len(chk['nonfinite'])} tensor(s), first {chk['nonfinite'][0]}"
    print(f"values       {finite}")
    base = man.get("base_model") or {}
    print(f"base         {base.get('name_or_path') or '?'} ({base.get('class') or '?'})")
    print(f"fingerprint  {man['base_fingerprint']}")
    print(f"sha256       {man['tensors'].get('sha256')} ({'ok' if chk['sha256_ok'] else 'MISMATCH'})")
    _print_training(man.get("training"))
    print(f"written by   deltakit {man.get('deltakit_version', '?')}")


def _print_training(training: dict | None) -> None:
    """The manifest's optional ``training`` entry: steps, metrics, data provenance, settings."""
    if not training:
        return
    metrics = ", ".join(f"{k} {v:.4f}" if isinstance(v, (int, float)) else f"{k} {v}"
                        for k, v in (training.get("metrics") or {}).items())
    print(f"training     {training.get('steps', '?')} steps" + (f"; {metrics}" if metrics else ""))
    for d in training.get("data") or []:
        sha = (d.get("sha256") or "?")[:12]
        print(f"  data       {d.get('split', '?')}: {d.get('path', '?')} ({d.get('rows', '?')} rows, sha256 {sha})")
    settings = training.get("settings")
    if settings:
        print(f"  settings   {json.dumps(settings)}")


def _verdict(path: Path, man: dict, chk: dict) -> None:
    """Raise the first problem found (the command then exits 1 with that line)."""
    from ..io.files import DeltakitFileError

    if chk["bytes_on_disk"] is None:
        raise DeltakitFileError(f"{chk['file']}: expected the adapter's tensor file, found nothing")
    if not chk["sha256_ok"]:
        raise DeltakitFileError(f"{chk['file']}: sha256 does not match the manifest")
    if chk["nonfinite"]:
        raise DeltakitFileError(f"{chk['file']}: tensor {chk['nonfinite'][0]!r} holds NaN/inf "
                                f"({len(chk['nonfinite'])} such tensor(s))")
    if not chk["method_known"]:
        from ..core.registry import get_method
        get_method(man["method"])  # raises "unknown method 'x'; expected one of [...]"


def run(args) -> int:
    from ..io.adapter_files import read_manifest
    from ..io.files import DeltakitFileError

    path = Path(args.adapter)
    from .compress import inspect_compressed, is_compressed_dir
    if is_compressed_dir(path):
        return inspect_compressed(path, args.json)
    man = read_manifest(path)
    missing = [k for k in REQUIRED if k not in man] or \
        [f"tensors.{k}" for k in ("file", "sha256") if k not in man["tensors"]]
    if missing:
        raise DeltakitFileError(f"{path / 'adapter.json'}: expected key {missing[0]!r} in the manifest, found none")
    chk = _checks(path, man)
    if args.json:
        print(json.dumps({**man, "checks": chk, "sha256_ok": chk["sha256_ok"]}, indent=2))
    else:
        _print_text(path, man, chk)
    _verdict(path, man, chk)
    return 0
