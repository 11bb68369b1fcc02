"""``deltakit merge RECIPE -o OUT`` and ``deltakit merge --list``: thin wrappers over deltakit.merge."""
from __future__ import annotations

import argparse

__all__ = ["add_parser", "run"]


def add_parser(sub) -> argparse.ArgumentParser:
    p = sub.add_parser("merge", help="merge checkpoints from a deltakit or mergekit YAML recipe",
                       description="Stream a merge into an HF-layout checkpoint directory (atomic).")
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
    p.add_argument("--list", action="store_true", help="list the registered merge methods and exit")
    p.set_defaults(func=run)
    return p


def run(args) -> int:
    from deltakit.io.files import guard_output
    from deltakit.merge import list_merges, load_recipe, run_recipe

    if args.list:
        from .._fmt import table
        rows = [{"method": n, "inputs": m.inputs, "reference": m.paper} for n, m in sorted(list_merges().items())]
        print(table(rows, ["method", "inputs", "reference"]))
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
