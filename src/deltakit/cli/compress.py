"""``deltakit compress`` / ``deltakit decompress`` and ``inspect`` of a compressed delta.

Thin wrappers over :mod:`deltakit.compress`: every codec, its knobs and their documentation come
from the compressor registry, so a codec registered later gets its ``--knob`` flags and its
``--list`` entry without a change here.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

__all__ = ["add_parsers", "run_compress", "run_decompress", "inspect_compressed", "is_compressed_dir"]

REF_SHAPE = (4096, 4096)  # --list plans bits/param on this shape (a 7B attention projection)
_RESERVED = {"out", "codec", "codecs", "list", "json", "ratio", "target_size", "base", "model", "overwrite",
             "no_progress", "set", "src", "func", "command", "debug", "data", "data_rows"}

EPILOG = """\
examples:
  deltakit compress --list
  deltakit compress runs/sentiment --codec topk --density 0.05 -o runs/sentiment.topk
  deltakit compress runs/sentiment --ratio 16 -o runs/sentiment.16x           # budget: codec per tensor
  deltakit compress runs/ft --base runs/base --target-size 20MB --codecs topk,keep -o runs/ft.20mb
  deltakit inspect runs/sentiment.16x
  deltakit decompress runs/ft.20mb --apply-to runs/base -o runs/ft-restored
"""


def _knob_specs() -> dict[str, list[tuple[str, object]]]:
    """knob name -> [(compressor, FieldSpec)] over every registered compressor."""
    from ..compress import list_compressors
    from ..core.fields import fields_of

    out: dict[str, list] = {}
    for c in list_compressors():
        for s in fields_of(c.config):
            out.setdefault(s.name, []).append((c.name, s))
    return out


def add_parsers(sub) -> None:
    _add_compress(sub)
    _add_decompress(sub)


def _add_compress(sub) -> None:
    from .commands import add_overwrite

    p = sub.add_parser("compress", help="compress a delta with one codec or to a size budget",
                       description="Compress a delta (an adapter directory, a task vector, or a fine-tuned "
                                   "checkpoint with --base) into one compressed-delta directory: with one "
                                   "--codec and its knobs, or to --target-size / --ratio, choosing codec and "
                                   "setting per tensor to minimise the total squared error.",
                       epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("src", nargs="?", metavar="SRC", help="adapter directory, task-vector directory, or fine-tuned "
                                                         "checkpoint (with --base)")
    p.add_argument("-o", "--out", help="output directory (written atomically)")
    add_overwrite(p, "compressed")
    p.add_argument("--codec", help="one codec for every tensor (deltakit compress --list)")
    p.add_argument("--target-size", help="budget mode: total size of the encoded tensors, e.g. 20MB, 512KiB")
    p.add_argument("--ratio", type=float, help="budget mode: the dense delta's bytes divided by this")
    p.add_argument("--codecs", help="budget mode: candidate codecs, comma-separated (default all, plus 'keep': "
                                    "a tensor left as it is)")
    p.add_argument("--base", help="base checkpoint: SRC - BASE for a fine-tuned checkpoint; for a task vector, "
                                  "the base whose fingerprint to record")
    p.add_argument("--model", help="an adapter's base model (default: the one its manifest records)")
    p.add_argument("--data", help="budget mode, adapter SRC: weight each tensor's error by the mean squared input "
                                  "activations on this data (a .tsv/.csv/.jsonl file or task directory)")
    p.add_argument("--data-rows", type=int, default=64, help="rows of --data to run (default 64, one at a time)")
    p.add_argument("--set", action="append", default=[], metavar="KNOB=VALUE",
                   help="a codec knob (same as --KNOB VALUE; repeatable)")
    p.add_argument("--list", action="store_true", help="list every codec with its knobs and bits/param, and exit")
    p.add_argument("--json", action="store_true", help="with --list: print JSON")
    p.add_argument("--no-progress", action="store_true", help="hide the progress bars")
    knobs = p.add_argument_group("codec knobs (each codec takes its own; see --list)")
    for name, users in sorted(_knob_specs().items()):
        if name not in _RESERVED:
            who = ", ".join(c for c, _ in users)
            flags = dict.fromkeys([f"--{name.replace('_', '-')}", f"--{name}"])  # --value-dtype, --value_dtype
            knobs.add_argument(*flags, dest=f"knob__{name}", metavar="V",
                               help=f"{users[0][1].doc} ({who})")
    p.set_defaults(func=run_compress)


def _add_decompress(sub) -> None:
    from ._common import add_strict_base
    from .commands import add_overwrite

    p = sub.add_parser("decompress", help="decode a compressed delta to a dense task vector, or apply it",
                       description="Decode a compressed delta (one tensor at a time) into a dense task-vector "
                                   "directory, or with --apply-to BASE stream BASE + delta into a checkpoint. "
                                   "The base's fingerprint is checked against the one the file records.")
    p.add_argument("src", metavar="SRC", help="compressed-delta directory (deltakit compress -o ...)")
    p.add_argument("-o", "--out", required=True, help="output directory (written atomically)")
    p.add_argument("--apply-to", metavar="BASE", help="base checkpoint: write BASE + delta (a merged checkpoint)")
    add_overwrite(p, "task vector / merged (the same mode)")
    add_strict_base(p)
    p.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    p.set_defaults(func=run_decompress)


# ----------------------------------------------------------------------------- --list
def _reference_bits(c) -> tuple[float | None, str]:
    """Bits/param of the default setting: planned on :data:`REF_SHAPE`, else measured on a
    random 256x256 tensor (a codec without a planning function)."""
    import torch

    cfg = c.config()
    if c.bits is not None:
        return float(c.bits(cfg, REF_SHAPE)), f"planned, {REF_SHAPE[0]}x{REF_SHAPE[1]}"
    g = torch.Generator().manual_seed(0)
    from ..compress import compress_tensor
    v = compress_tensor(torch.randn(256, 256, generator=g), c.name, cfg)
    return 8.0 * sum(t.nbytes for t in v.tensors().values()) / v.numel, "measured, 256x256"


def _print_list(as_json: bool) -> None:
    from ..compress import list_compressors
    from ..core.fields import fields_of

    rows = []
    for c in list_compressors():
        bits, how = _reference_bits(c)
        rows.append({"codec": c.name, "description": c.doc, "reference": c.paper, "bits_per_param": bits,
                     "bits_how": how, "describe": c.describe(),
                     "knobs": [{"name": s.name, "default": s.default, "type": s.describe(), "doc": s.doc}
                               for s in fields_of(c.config)]})
    if as_json:
        print(json.dumps([{k: v for k, v in r.items() if k != "describe"} for r in rows], indent=2))
        return
    for r in rows:
        print(r["describe"][0])
        print(f"    {r['bits_per_param']:.3f} bits/param at the defaults ({r['bits_how']})")
        for line in r["describe"][1:]:
            print(line)
    print("\nknobs: --NAME VALUE (or --set NAME=VALUE); budget mode sweeps the size knobs of every codec in "
          "--codecs; 'keep' leaves a tensor as it is")


# ----------------------------------------------------------------------------- compress
def _knobs(args) -> dict[str, str]:
    from ..core.fields import ConfigError

    out = {k[len("knob__"):]: v for k, v in vars(args).items() if k.startswith("knob__") and v is not None}
    for pair in args.set:
        if "=" not in pair:
            raise ConfigError(f"--set expects KNOB=VALUE, found {pair!r}")
        k, v = pair.split("=", 1)
        out[k.replace("-", "_")] = v
    return out


def _check_mode(args, knobs: dict) -> None:
    budget = args.target_size is not None or args.ratio is not None
    if not args.src or not args.out:
        raise ValueError("expected SRC and -o OUT, found " + ("no SRC" if not args.src else "no -o OUT"))
    if (args.codec is None) == (not budget) or (args.target_size is not None and args.ratio is not None):
        raise ValueError("expected exactly one of --codec, --target-size and --ratio")
    if budget and knobs:
        raise ValueError(f"budget mode sweeps the knobs itself; found --{next(iter(knobs))} (use --codec for fixed "
                         f"knobs)")
    if (args.codecs or args.data) and not budget:
        raise ValueError(f"{'--codecs' if args.codecs else '--data'} serves budget mode; give --target-size or "
                         f"--ratio with it")


def run_compress(args) -> int:
    from ..compress.api import compress, open_delta
    from ..compress.budget import parse_size
    from ..io.files import guard_output

    if args.list:
        _print_list(args.json)
        return 0
    knobs = _knobs(args)
    _check_mode(args, knobs)
    if args.codec is not None:
        from ..compress import build_compressor_config
        build_compressor_config(args.codec, knobs, where=f"--codec {args.codec}")  # bad knob: before any work
    guard_output(args.out, "compressed", inputs=[i for i in (args.src, args.base, args.model) if i],
                 overwrite=args.overwrite)
    delta = open_delta(args.src, base=args.base, model=args.model)
    stats = _activation_stats(delta, args) if args.data else None
    res = compress(delta, args.out, codec=args.codec, knobs=knobs, stats=stats,
                   target_bytes=parse_size(args.target_size) if args.target_size else None, ratio=args.ratio,
                   codecs=args.codecs.split(",") if args.codecs else None, progress=not args.no_progress)
    if res.allocation is not None:
        print(res.allocation.table())
    if res.kept:
        name, why = next(iter(res.kept.items()))
        print(f"kept as is: {len(res.kept)} tensor(s) {args.codec} cannot encode (first {name}: {why})")
    _print_summary(res.path)
    return 0


def _activation_stats(delta, args) -> dict:
    """Mean x^2 per input feature of every linear layer of the adapted model on ``--data``, one
    row at a time (so no padding enters the statistics)."""
    from transformers import AutoTokenizer

    from ..compress.budget import activation_stats
    from ..train.data import make_loader
    from ._common import read_data

    if delta.model is None:
        raise ValueError("--data needs an adapter SRC (its base model runs the data); a checkpoint pair or a task "
                         "vector has no model here")
    if args.data_rows < 1:
        raise ValueError(f"expected --data-rows >= 1, found {args.data_rows}")
    rows, _ = read_data(args.data, "train", need_labels=False)
    tok = AutoTokenizer.from_pretrained(delta.model_path)
    delta.model.eval()
    batches = ({k: v for k, v in b.items() if k != "labels"}
               for b in make_loader(rows[: args.data_rows], tok, batch_size=1))
    stats = activation_stats(delta.model, batches)
    print(f"activation statistics: {len(stats)} linear layers, {min(len(rows), args.data_rows)} rows of {args.data}")
    return stats


def _print_summary(path: Path) -> None:
    from ..compress.container import load_compressed

    f = load_compressed(path)
    ratio = f.original_bytes / f.total_bytes if f.total_bytes else float("inf")
    print(f"wrote {path}: {len(f.records)} tensors, {f.total_bytes:,} bytes encoded ({f.file_bytes:,} on disk) "
          f"for {f.original_bytes:,} dense, {ratio:.1f}x")


# ----------------------------------------------------------------------------- decompress
def run_decompress(args) -> int:
    from ..compress.container import Source, load_compressed, write_compressed
    from ..io.files import guard_output
    from ..taskvec import as_dense

    kind = "merged" if args.apply_to else "taskvector"
    guard_output(args.out, kind, inputs=[i for i in (args.src, args.apply_to) if i], overwrite=args.overwrite)
    f = load_compressed(args.src)
    progress = not args.no_progress
    if args.apply_to:
        if args.strict_base:
            f.check_base(args.apply_to)
            if f.base_fingerprint is None:
                print(f"note: {args.src} records no base fingerprint; the base was not checked", file=sys.stderr)
        f.task_vector().apply_to_checkpoint(args.apply_to, args.out, progress=progress, kind="merged")
        print(f"wrote {args.out}: {args.apply_to} + {args.src}")
        return 0
    entries = {n: Source(lambda n=n: as_dense(f.get(n))) for n in f.records}
    write_compressed(args.out, entries, base_fingerprint=f.base_fingerprint,
                     base_exclude=f.header.get("base_exclude") or [], info={"source": "decompressed",
                                                                            "path": str(args.src)},
                     progress=progress, kind="taskvector", desc="decoding")
    print(f"wrote {args.out}: the dense task vector of {args.src} ({len(f.records)} tensors)")
    return 0


# ----------------------------------------------------------------------------- inspect
def is_compressed_dir(path: Path) -> bool:
    """A safetensors directory rather than an adapter: inspect reads it as a (compressed) task
    vector, so a damaged one gets its own error, not 'adapter.json missing'."""
    from ..io.tensors import INDEX_NAME, SINGLE_NAME
    return path.is_dir() and not (path / "adapter.json").is_file() and \
        ((path / SINGLE_NAME).is_file() or (path / INDEX_NAME).is_file())


def inspect_compressed(path: Path, as_json: bool) -> int:
    """Per tensor: codec, bits/param, bytes, ratio; then totals. Reads and checks every entry
    (sha256, decodes), exiting non-zero on the first bad one after printing."""
    from .._fmt import table
    from ..compress.container import load_compressed

    f = load_compressed(path)
    rows = [{"tensor": r.name, "codec": r.label, "shape": "x".join(map(str, r.shape)),
             "bits/param": round(r.bits_per_param, 3), "bytes": r.bytes, "ratio": round(r.ratio, 2)}
            for r in f.records.values()]
    totals = {"tensors": len(rows), "bytes": f.total_bytes, "file_bytes": f.file_bytes,
              "dense_bytes": f.original_bytes, "ratio": round(f.original_bytes / max(1, f.total_bytes), 2),
              "bits_per_param": round(8 * f.total_bytes / max(1, sum(r.numel for r in f.records.values())), 3)}
    if as_json:
        print(json.dumps({"path": str(path), "header": f.header, "entries": rows, "totals": totals}, indent=2))
    else:
        print(table(rows, ["tensor", "codec", "shape", "bits/param", "bytes", "ratio"]))
        print(f"total        {totals['tensors']} tensors, {totals['bytes']:,} bytes encoded "
              f"({totals['file_bytes']:,} on disk), {totals['bits_per_param']} bits/param, "
              f"{totals['ratio']}x smaller than the dense {totals['dense_bytes']:,} bytes")
        extra = {k: v for k, v in f.header.items() if k not in ("format", "base_fingerprint", "base_exclude")}
        print(f"fingerprint  {f.base_fingerprint or 'none recorded'}")
        if extra:
            print(f"made by      {json.dumps(extra)}")
    f.verify()
    return 0
