"""``deltakit merge RECIPE -o OUT`` and ``deltakit merge --list``: thin wrappers over deltakit.merge."""
from __future__ import annotations

import argparse
import json

__all__ = ["add_parser", "run", "EXAMPLE_RECIPE", "method_parameters"]

# Kept in step with README.md's merge example; tests/cli run it as written.
EXAMPLE_RECIPE = """\
method: ties                 # deltakit merge --list: every method, its parameters and defaults
base_model: minilm           # the adapters' base (also the default when there are adapters)
models:
  - model: runs/sentiment    # a deltakit adapter directory (deltakit train -o ...) or a checkpoint
    weight: 1.0
  - model: runs/question
    weight: 1.0
parameters:
  density: 0.2               # keep the top 20% of each task vector
  lam: 1.0
dtype: float32
"""

EPILOG = f"""\
example: train two adapters, merge them, score the merge (paths relative to the recipe file;
the first line writes two synthetic GLUE-style tasks, use your own files instead)

  python -c "from deltakit.train.synthetic import write_task as w; w('data/sentiment', 'sentiment'); \
w('data/question', 'question')"
  deltakit train --train data/sentiment -o runs/sentiment
  deltakit train --train data/question -o runs/question
  deltakit merge merge.yaml -o runs/merged
  deltakit eval runs/merged --data data/sentiment

merge.yaml:

{EXAMPLE_RECIPE}
A model or base_model may be a checkpoint directory, a deltakit adapter directory (merged as
base + adapter) or 'minilm'. mergekit recipes (with merge_method) are read as well.
"""


def add_parser(sub) -> argparse.ArgumentParser:
    p = sub.add_parser("merge", help="merge checkpoints or adapters from a deltakit or mergekit YAML recipe",
                       description="Stream a merge into an HF-layout checkpoint directory (atomic).",
                       epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("recipe", nargs="?", help="recipe YAML (deltakit format, or mergekit's merge_method format)")
    p.add_argument("-o", "--out", help="output checkpoint directory; it must not exist or be empty, unless --overwrite")
    p.add_argument("--overwrite", action="store_true",
                   help="replace an existing output if it is a deltakit merged checkpoint "
                        "(anything else, or one of the recipe's models, is refused even then)")
    p.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    g = p.add_mutually_exclusive_group()
    g.add_argument("--fsync", action="store_true",
                   help="flush every shard to the disk before the atomic rename, so the output also survives a "
                        "power loss (waits for the disk: ~3 s per GB here); by default the output is atomic "
                        "against this process dying, as durable as mergekit's and save_pretrained's")
    g.add_argument("--no-fsync", action="store_true", help=argparse.SUPPRESS)  # the default; kept for old scripts
    p.add_argument("--list", action="store_true",
                   help="list the registered merge methods with their parameters and defaults, and exit")
    p.add_argument("--json", action="store_true", help="with --list: print JSON")
    p.set_defaults(func=run)
    return p


def method_parameters(method) -> list[dict]:
    """``[{"name", "type", "default", "range", "doc"}]`` for one merge method's config fields,
    read from the fields' one declaration (:func:`deltakit.core.fields.fields_of`)."""
    from deltakit.core.fields import fields_of

    out = []
    for f in fields_of(method.config):
        default = list(f.default) if isinstance(f.default, tuple) else f.default
        kind = f.describe() + (", or one per model" if f.per_model else "")
        out.append({"name": f.name, "type": kind, "default": default, "doc": f.doc})
    return out


def _print_list(as_json: bool) -> None:
    from deltakit.merge import list_merges

    rows = [{"method": n, "inputs": "task vectors" if m.inputs == "deltas" else "weights", "reference": m.paper,
             "statistics": [*m.needs_stats, *m.uses_stats], "parameters": method_parameters(m)}
            for n, m in sorted(list_merges().items())]
    if as_json:
        print(json.dumps(rows, indent=2))
        return
    for r in rows:
        stats = f"; statistics: {', '.join(r['statistics'])}" if r["statistics"] else ""
        print(f"{r['method']}  (merges {r['inputs']}; {r['reference']}{stats})")
        width = max(len(p["name"]) for p in r["parameters"]) if r["parameters"] else 0
        for p in r["parameters"]:
            print(f"    {p['name'].ljust(width)}  = {json.dumps(p['default'])}  ({p['type']}) {p['doc']}")
    print("\nA per-model field goes under each models[] entry (weights as 'weight: 1.0', density: 0.5) or, as one "
          "value for all, under parameters; the others go under parameters. A number list gives a gradient over "
          "layer depth, [{filter: mlp, value: 0.5}, {value: 0.2}] a value by tensor name.")


def run(args) -> int:
    from deltakit.io.files import guard_output
    from deltakit.merge import load_recipe, run_recipe

    if args.list:
        _print_list(args.json)
        return 0
    if not args.recipe or not args.out:
        raise ValueError("expected RECIPE and -o OUT, found " + ("no recipe" if not args.recipe else "no -o OUT"))
    recipe = load_recipe(args.recipe)
    inputs = [args.recipe, *recipe.models, *([recipe.base_model] if recipe.base_model else []),
              *(f for files in recipe.stats.values() for f in files)]
    guard_output(args.out, "merged", inputs=[i for i in inputs if isinstance(i, str)], overwrite=args.overwrite)
    out = run_recipe(recipe, args.out, progress=not args.no_progress, fsync=args.fsync)
    print(f"wrote merged checkpoint to {out}")
    return 0
