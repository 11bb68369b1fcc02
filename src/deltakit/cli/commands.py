"""Sub-commands. Each ``add_*`` registers a parser; each ``run_*`` calls the library."""
from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import typing
from pathlib import Path

from .._fmt import table
from ..core.registry import ConfigError, get_method, methods

BUNDLED_HELP = "model directory, hub id, or 'minilm' for the bundled all-MiniLM-L6-v2 (default)"


# ----------------------------------------------------------------------------- helpers
def parse_settings(spec_config: type, pairs: list[str]) -> dict:
    """``["r=8", "targets=query,value"]`` -> typed config fields."""
    hints = typing.get_type_hints(spec_config)
    fields = {f.name for f in dataclasses.fields(spec_config)}
    out = {}
    for pair in pairs:
        if "=" not in pair:
            raise ConfigError(f"--set expects KEY=VALUE, found {pair!r}")
        key, raw = pair.split("=", 1)
        if key not in fields:
            raise ConfigError(f"{spec_config.__name__} has no field {key!r}; expected one of {sorted(fields)}")
        out[key] = _coerce(hints[key], raw, key)
    return out


def _coerce(hint, raw: str, key: str):
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (typing.Union, getattr(__import__("types"), "UnionType", None)):
        if raw.lower() in ("none", "null") and type(None) in args:
            return None
        hint = next(a for a in args if a is not type(None))
        origin, args = typing.get_origin(hint), typing.get_args(hint)
    try:
        if hint is bool:
            if raw.lower() not in ("true", "false", "1", "0", "yes", "no"):
                raise ValueError
            return raw.lower() in ("true", "1", "yes")
        if hint in (int, float, str):
            return hint(raw)
        if origin is tuple:
            item = args[0] if args else str
            return tuple(item(v) for v in raw.split(",") if v)
        if origin is typing.Literal:
            return raw
    except ValueError:
        raise ConfigError(f"--set {key}: expected {getattr(hint, '__name__', hint)}, found {raw!r}") from None
    return raw


# ----------------------------------------------------------------------------- methods
def add_methods(sub) -> None:
    p = sub.add_parser("methods", help="list the registered PEFT methods",
                       description="List every registered method with its kind, reference and a one-line description.")
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")
    p.set_defaults(func=run_methods)


def run_methods(args) -> int:
    rows = [{"method": s.name, "kind": s.kind, "description": s.description, "reference": s.paper}
            for s in sorted(methods().values(), key=lambda s: s.name)]
    print(json.dumps(rows, indent=2) if args.json else table(rows, ["method", "kind", "description", "reference"]))
    return 0


# ----------------------------------------------------------------------------- inspect
def add_inspect(sub) -> None:
    p = sub.add_parser("inspect", help="describe a saved adapter",
                       description="Show an adapter directory's method, config, targets, parameter counts, "
                                   "bytes on disk and base fingerprint (checks the file's sha256).")
    p.add_argument("adapter", help="adapter directory (adapter.json + adapter.safetensors)")
    p.add_argument("--json", action="store_true", help="print the manifest as JSON")
    p.set_defaults(func=run_inspect)


def run_inspect(args) -> int:
    from ..io.adapter_files import read_manifest
    from ..io.files import DeltakitFileError, sha256_file

    path = Path(args.adapter)
    man = read_manifest(path)
    tensor_file = path / man["tensors"]["file"]
    ok = tensor_file.is_file() and sha256_file(tensor_file) == man["tensors"]["sha256"]
    if args.json:
        print(json.dumps({**man, "sha256_ok": ok}, indent=2))
    else:
        targets = man["targets"]
        by_method: dict[str, int] = {}
        for t in targets.values():
            by_method[t["method"]] = by_method.get(t["method"], 0) + 1
        cfg = {k: v for k, v in man["config"].items() if v not in (None, [], ())}
        print(f"adapter      {path}")
        print(f"method       {man['method']} ({man['kind']} delta)")
        print(f"config       {json.dumps(cfg)}")
        print(f"targets      {len(targets)} ({', '.join(f'{n} {m}' for m, n in by_method.items())})")
        for name in list(targets)[:6]:
            print(f"               {name}  [{targets[name]['type']}]")
        if len(targets) > 6:
            print(f"               ... {len(targets) - 6} more")
        print(f"parameters   {man['parameters']['trainable']:,} trainable / {man['parameters']['total']:,} stored")
        print(f"bytes        {man['tensors']['bytes']:,} on disk ({man['tensors']['count']} tensors)")
        base = man.get("base_model") or {}
        print(f"base         {base.get('name_or_path') or '?'} ({base.get('class') or '?'})")
        print(f"fingerprint  {man['base_fingerprint']}")
        print(f"sha256       {man['tensors']['sha256']} ({'ok' if ok else 'MISMATCH'})")
        print(f"written by   deltakit {man['deltakit_version']}")
    if not ok:
        raise DeltakitFileError(f"{tensor_file}: sha256 does not match the manifest")
    return 0


# ----------------------------------------------------------------------------- export
def add_export(sub) -> None:
    p = sub.add_parser("export", help="write base+adapter merged, or the adapter in peft format",
                       description="Export an adapter: 'merged' writes a plain transformers checkpoint "
                                   "(safetensors) with the adapter folded into the base weights; 'peft' "
                                   "writes a Hugging Face peft LoRA adapter directory.")
    p.add_argument("adapter", help="adapter directory")
    p.add_argument("-o", "--out", required=True, help="output directory (written atomically)")
    p.add_argument("--format", choices=["merged", "peft"], default="merged", help="what to write (default merged)")
    p.add_argument("--model", default=None,
                   help="base model (default: the one recorded in the adapter manifest); " + BUNDLED_HELP)
    p.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], default=None,
                   help="dtype of the merged checkpoint (default: the base's)")
    p.set_defaults(func=run_export)


def _load_base_for(man: dict, model_arg: str | None):
    import transformers

    from ..io.models import resolve_model

    base = man.get("base_model") or {}
    src = model_arg or base.get("name_or_path")
    if not src:
        raise ValueError("the adapter does not record its base model; pass --model")
    cls_name = base.get("class") or "AutoModel"
    cls = getattr(transformers, cls_name, None)
    if cls is None:
        raise ValueError(f"unknown base model class {cls_name!r} in the manifest")
    kwargs = {"num_labels": base["num_labels"]} if base.get("num_labels") and "Classification" in cls_name else {}
    path = resolve_model(src)
    from transformers.utils import logging
    logging.set_verbosity_error()
    return cls.from_pretrained(path, **kwargs), path


def run_export(args) -> int:
    import torch

    from ..core.adapter import merge_and_detach
    from ..io.adapter_files import load_adapter
    from ..io.adapter_files import read_manifest
    from ..io.files import atomic_dir

    man = read_manifest(args.adapter)
    model, path = _load_base_for(man, args.model)
    adapter = load_adapter(model, args.adapter)
    out = Path(args.out)
    if args.format == "peft":
        from ..io.peft import export_peft
        export_peft(adapter, out)
    else:
        merge_and_detach(model)
        if args.dtype:
            model.to(getattr(torch, args.dtype))
        with atomic_dir(out) as tmp:
            model.save_pretrained(tmp, safe_serialization=True)
            try:
                from transformers import AutoTokenizer
                AutoTokenizer.from_pretrained(path).save_pretrained(tmp)
            except Exception:  # a base without a tokenizer is still a valid checkpoint
                pass
    print(f"wrote {args.format} export of {args.adapter} to {out}")
    return 0


# ----------------------------------------------------------------------------- bench
BENCHES = {"lora": "bench_lora", "methods": "bench_methods", "merge": "bench_merge",
           "merge-quality": "bench_merge_quality"}


def add_bench(sub) -> None:
    p = sub.add_parser("bench", help="run a benchmark from bench/ (JSON to bench/results/)",
                       description="Run one of the repository's benchmarks; results go to bench/results/*.json. "
                                   "Needs a source checkout (the bench/ folder) and the 'bench' extra.")
    p.add_argument("name", choices=sorted(BENCHES), help="which benchmark")
    p.add_argument("options", nargs=argparse.REMAINDER,
                   help="the benchmark's own options, e.g. --quick (a smoke run); "
                        "'deltakit bench NAME --help' lists them")
    p.set_defaults(func=run_bench)


def run_bench(args) -> int:
    """Run ``bench/<script>.py``'s ``main(options)`` (the same as ``python bench/<script>.py``)."""
    import importlib.util

    root = Path(__file__).resolve().parents[3] / "bench"
    script = root / f"{BENCHES[args.name]}.py"
    if not script.is_file():
        raise FileNotFoundError(f"expected the benchmark script {script}; 'deltakit bench' runs from a source checkout")
    spec = importlib.util.spec_from_file_location(BENCHES[args.name], script)
    mod = importlib.util.module_from_spec(spec)
    sys.path.insert(0, str(root))
    # registered before it runs, as an import would: dataclasses (with postponed annotations)
    # and pickling for worker processes look the module up in sys.modules
    sys.modules[spec.name] = mod
    spec.loader.exec_module(mod)
    return int(mod.main(args.options) or 0)


# ----------------------------------------------------------------------------- train
def add_train(sub) -> None:
    p = sub.add_parser("train", help="train an adapter on a text-classification file",
                       description="Train one adapter on CSV / TSV / JSONL data with GLUE-style columns "
                                   "(sentence or sentence1+sentence2, label) and save it as a directory.")
    p.add_argument("--model", default="minilm", help=BUNDLED_HELP)
    p.add_argument("--train", required=True, help="training file (.csv, .tsv, .jsonl) or a GLUE-style directory")
    p.add_argument("--dev", default=None, help="evaluation file (default: none, or dev.tsv of a directory)")
    p.add_argument("--method", default="lora", help="method name (see 'deltakit methods'; default lora)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="method hyper-parameter, repeatable (e.g. --set r=8 --set targets=query,value)")
    p.add_argument("--lr", type=float, default=5e-4, help="peak learning rate (default 5e-4)")
    p.add_argument("--steps", type=int, default=200, help="optimiser steps (default 200)")
    p.add_argument("--batch-size", type=int, default=16, help="batch size per process (default 16)")
    p.add_argument("--max-length", type=int, default=128, help="tokens per example (default 128)")
    p.add_argument("--max-rows", type=int, default=None, help="subsample the training file to this many rows")
    p.add_argument("--metric", default="accuracy", choices=["accuracy", "f1", "f1_macro", "mcc"],
                   help="evaluation metric (default accuracy)")
    p.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    p.add_argument("--autocast", default=None, choices=["bf16", "fp16"],
                   help="mixed precision: forward under torch.autocast, fp32 master weights (default off)")
    p.add_argument("--ckpt-dir", default=None, help="checkpoint directory; training resumes from it")
    p.add_argument("-o", "--out", required=True, help="adapter output directory")
    p.set_defaults(func=run_train)


def _read_split(path: str, split: str, max_rows=None, seed=0):
    from ..train.data import load_glue_dir, read_rows

    p = Path(path)
    if p.is_dir():
        return load_glue_dir(p, split, max_rows=max_rows, seed=seed)
    return read_rows(p, max_rows=max_rows, seed=seed)


def run_train(args) -> int:
    import torch

    from ..core.adapter import attach, param_counts
    from ..io.adapter_files import save_adapter
    from ..io.models import head_modules, load_classifier
    from ..train import fit
    from ..train.data import make_loader, num_labels

    spec = get_method(args.method)
    settings = parse_settings(spec.config, args.set)
    train_rows = _read_split(args.train, "train", args.max_rows, args.seed)
    dev_path = args.dev or (args.train if Path(args.train).is_dir() else None)
    dev_rows = _read_split(dev_path, "dev") if dev_path else None
    k = num_labels(train_rows, *([dev_rows] if dev_rows else []))
    model, tok = load_classifier(args.model, max(k, 2), seed=args.seed)
    settings.setdefault("modules_to_save", head_modules(model))
    config = spec.config(**settings)
    adapter = attach(model, config, name=Path(args.out).name or "default")
    trainable, total = param_counts(model)
    print(f"{spec.name}: {trainable:,} trainable of {total:,} parameters ({100 * trainable / total:.3f}%)")
    train_loader = make_loader(train_rows, tok, batch_size=args.batch_size, max_length=args.max_length,
                               shuffle=True, seed=args.seed)
    dev_loader = make_loader(dev_rows, tok, batch_size=64, max_length=args.max_length) if dev_rows else None
    params, callbacks = adapter.training_hooks(loader=train_loader, total_steps=args.steps)
    result = fit(model, train_loader, eval_loader=dev_loader, metric=args.metric, lr=args.lr,
                 max_steps=args.steps, warmup_steps=max(1, args.steps // 10), seed=args.seed,
                 ckpt_dir=args.ckpt_dir, eval_every=None, params=params, callbacks=callbacks,
                 autocast={"bf16": torch.bfloat16, "fp16": torch.float16}.get(args.autocast))
    save_adapter(adapter, args.out)
    shown = {k: round(v, 4) for k, v in result.metrics.items()}
    print(f"saved {args.out}  {json.dumps(shown)}")
    return 0


# ----------------------------------------------------------------------------- demo
def add_demo(sub) -> None:
    p = sub.add_parser("demo", help="the main job: LoRA per synthetic task on the bundled MiniLM",
                       description="Train a LoRA adapter per synthetic task on all-MiniLM-L6-v2, evaluate base "
                                   "vs adapter, save the adapters and print a results table (runs on its "
                                   "embedded defaults with no arguments).")
    p.add_argument("--model", default="minilm", help=BUNDLED_HELP)
    p.add_argument("--out", default="runs/demo", help="output directory (default runs/demo)")
    p.add_argument("--steps", type=int, default=None, help="training steps per task (default: the demo's)")
    p.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    p.set_defaults(func=run_demo)


def run_demo(args) -> int:
    from ..demo import DemoConfig, run

    cfg = DemoConfig(model=args.model, out=args.out, seed=args.seed)
    if args.steps is not None:
        cfg = dataclasses.replace(cfg, steps=args.steps)
    run(cfg)
    return 0


def add_merge(sub) -> None:
    from .merge import add_parser
    add_parser(sub)


REGISTER = [add_train, add_inspect, add_export, add_merge, add_methods, add_demo, add_bench]
