"""Benchmark: deltakit's streaming merge vs mergekit's Python API, same recipe, same inputs.

Linear and TIES over K=4 "fine-tunes" (base + noise) of a ~320M-parameter Llama-style
model with random weights, in fp32 and bf16. Each merge runs in its own subprocess so the
peak RSS (ru_maxrss of that process) and the wall time (process start to exit, imports
included) are measured per merge, each starting from a synced disk and a page cache holding
all inputs; each merge runs ``--repeats`` times per tool (order
alternated) and the median wall time is reported. Outputs are compared tensor by tensor.

    .venv/bin/python bench/bench_merge.py                 # full run (~320M params, ~10 GB in /tmp)
    .venv/bin/python bench/bench_merge.py --hidden 256 --layers 4 --vocab 4096   # quick smoke run

Writes bench/results/merge_speed.json.
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import time
from pathlib import Path

from _common import RESULTS, machine_info, write_json


# --- child side: run one merge and report its own peak RSS -----------------------------------
def _child(tool: str, recipe_path: str, out_dir: str) -> None:
    import yaml

    cfg = yaml.safe_load(Path(recipe_path).read_text())
    t0 = time.perf_counter()
    if tool == "mergekit":
        from mergekit.config import MergeConfiguration
        from mergekit.merge import run_merge
        from mergekit.options import MergeOptions

        run_merge(MergeConfiguration.model_validate(cfg), out_path=out_dir,
                  options=MergeOptions(cuda=False, copy_tokenizer=False, write_model_card=False, quiet=True))
    else:
        from deltakit.merge import load_recipe, run_recipe

        rec = load_recipe(cfg)
        if tool == "deltakit_exact" and getattr(rec.method.config(), "sparsify", None) == "magnitude":
            # mergekit's tie order at the trim threshold (full argsort) instead of the O(n) selection
            rec.shared["sparsify"] = "magnitude_sort"
        # "deltakit" keeps the fsync'd measurement of earlier runs (stricter than mergekit, which
        # does not fsync); "deltakit_nofsync" is deltakit's default, mergekit's durability
        run_recipe(rec, out_dir, progress=False, fsync=tool != "deltakit_nofsync")
    merge_s = time.perf_counter() - t0
    rss_kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux
    print(json.dumps({"merge_s": merge_s, "peak_rss_mb": rss_kb / 1024}))


# --- parent side ------------------------------------------------------------------------------
def _generate(cache: Path, args) -> dict[str, list[Path]]:
    """base + K noisy fine-tunes per dtype, saved with transformers (skipped when cached)."""
    import torch
    import transformers

    tag = f"h{args.hidden}_l{args.layers}_v{args.vocab}_k{args.k}"
    root = cache / tag
    done = root / "DONE"
    dirs = {dt: [root / dt / "base"] + [root / dt / f"ft{i}" for i in range(args.k)] for dt in args.dtypes}
    if done.exists():
        return dirs
    shutil.rmtree(root, ignore_errors=True)
    cfg = transformers.LlamaConfig(hidden_size=args.hidden, intermediate_size=int(args.hidden * 2.75),
                                   num_hidden_layers=args.layers, num_attention_heads=args.hidden // 64,
                                   num_key_value_heads=args.hidden // 64, vocab_size=args.vocab,
                                   tie_word_embeddings=False)
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(cfg)
    n_params = sum(p.numel() for p in model.parameters())
    print(f"generating {n_params / 1e6:.0f}M-parameter model into {root}", flush=True)
    base = {k: v.detach().clone() for k, v in model.state_dict().items()}
    for i in range(args.k + 1):
        if i > 0:
            g = torch.Generator().manual_seed(1000 + i)
            with torch.no_grad():
                for k, p in model.state_dict().items():
                    p.copy_(base[k] + 0.002 * torch.randn(p.shape, generator=g))
        for dt in args.dtypes:
            d = dirs[dt][i]
            m = model if dt == "fp32" else model.to(torch.bfloat16)
            m.save_pretrained(d, safe_serialization=True)
            if dt != "fp32":
                model.to(torch.float32)
                with torch.no_grad():  # to(bf16) and back rounds the weights; restore exact values
                    g = torch.Generator().manual_seed(1000 + i)
                    for k, p in model.state_dict().items():
                        p.copy_(base[k] + (0.002 * torch.randn(p.shape, generator=g) if i > 0 else 0))
        print(f"  model {i}/{args.k} saved", flush=True)
    (root / "params.json").write_text(json.dumps({"n_params": n_params}))
    done.write_text("ok")
    return dirs


def _recipe(method: str, dirs: list[Path], dt: str) -> dict:
    base, fts = dirs[0], dirs[1:]
    dtype = "float32" if dt == "fp32" else "bfloat16"
    if method == "linear":
        w = [0.4, 0.3, 0.2, 0.1, 0.25, 0.25][: len(fts)]
        return {"merge_method": "linear", "dtype": dtype,
                "models": [{"model": str(p), "parameters": {"weight": x}} for p, x in zip(fts, w)]}
    dens = [0.5, 0.4, 0.6, 0.3, 0.5, 0.5][: len(fts)]
    return {"merge_method": "ties", "base_model": str(base), "dtype": dtype,
            "parameters": {"normalize": True},
            "models": [{"model": str(p), "parameters": {"weight": 1.0, "density": d}} for p, d in zip(fts, dens)]}


def _warm(dirs: list[Path]) -> None:
    """Read every input file so both tools start from a page cache holding all inputs (the
    other tool's multi-GB RSS may have evicted some since the last run)."""
    for p in dirs:
        for f in p.glob("*.safetensors"):
            with open(f, "rb") as fh:
                while fh.read(1 << 24):
                    pass


def _run(tool: str, recipe: dict, work: Path, inputs: list[Path]) -> dict:
    import yaml

    out = work / f"out_{tool}"
    shutil.rmtree(out, ignore_errors=True)
    rp = work / f"recipe_{tool}.yaml"
    rp.write_text(yaml.safe_dump(recipe))
    # flush the previous run's dirty pages first: a tool that does not fsync its output
    # (mergekit) would otherwise leave its write-back to slow down whichever run comes next
    os.sync()
    _warm(inputs)
    t0 = time.perf_counter()
    proc = subprocess.run([sys.executable, __file__, "--child", tool, str(rp), str(out)],
                          capture_output=True, text=True)
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        raise RuntimeError(f"{tool} failed:\n{proc.stderr[-3000:]}")
    res = json.loads(proc.stdout.strip().splitlines()[-1])
    res["wall_s"] = wall
    return res


def _compare(a: Path, b: Path) -> dict:
    import torch

    from deltakit.taskvec import LazyCheckpoint

    ca, cb = LazyCheckpoint(a), LazyCheckpoint(b)
    if sorted(ca.keys()) != sorted(cb.keys()):
        return {"same_names": False}
    worst, worst_name, rel = 0.0, None, 0.0
    for n in ca.keys():
        x, y = ca.get(n, torch.float32), cb.get(n, torch.float32)
        d = float((x - y).abs().max())
        if d > worst:
            worst, worst_name = d, n
            rel = d / max(float(x.abs().max()), 1e-30)
    return {"same_names": True, "max_abs_diff": worst, "worst_tensor": worst_name, "rel_to_max_abs": rel,
            "dtype_equal": all(ca.dtype(n) == cb.dtype(n) for n in ca.keys())}


QUICK = {"hidden": 128, "layers": 2, "vocab": 1024, "repeats": 1}  # seconds, for a smoke run


def _args(argv: list[str]) -> argparse.Namespace:
    ap = argparse.ArgumentParser(prog="bench_merge.py", description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true",
                    help=f"tiny model ({QUICK}), output under --cache unless --out is given (smoke run)")
    ap.add_argument("--cache", default="/tmp/deltakit_bench_merge")
    ap.add_argument("--hidden", type=int, default=1024)
    ap.add_argument("--layers", type=int, default=20)
    ap.add_argument("--vocab", type=int, default=32000)
    ap.add_argument("--k", type=int, default=4)
    ap.add_argument("--dtypes", nargs="+", default=["fp32", "bf16"])
    ap.add_argument("--methods", nargs="+", default=["linear", "ties"])
    ap.add_argument("--out-root", default=None,
                    help="where both tools write their outputs (default: beside the inputs); e.g. /dev/shm "
                         "to take the disk's write bandwidth out of the comparison")
    ap.add_argument("--repeats", type=int, default=3, help="runs per tool, order alternated; the median is reported")
    ap.add_argument("--out", default=None, help="JSON to write (default bench/results/merge_speed.json)")
    ap.add_argument("--generate-only", action="store_true")
    ap.add_argument("--tools", nargs="+", default=["mergekit", "deltakit"],
                    help="mergekit, deltakit, deltakit_exact (TIES with mergekit's tie order), "
                         "deltakit_nofsync (deltakit's default since 2026-11-24: outputs not fsynced, as mergekit's; "
                         "'deltakit' runs with fsync)")
    args = ap.parse_args(argv)
    if args.quick:
        for k, v in QUICK.items():
            if getattr(args, k) == ap.get_default(k):
                setattr(args, k, v)
    if args.out is None:
        cache = Path(args.cache)
        args.out = str(cache / "merge_speed_quick.json" if args.quick else RESULTS / "merge_speed.json")
    return args


def _row(args, method: str, dt: str, dirs: list[Path], work: Path) -> dict:
    """One (method, dtype): every tool ``--repeats`` times (order alternated), the median run by
    wall time with every sample kept, the load before and after, and the outputs compared."""
    recipe = _recipe(method, dirs, dt)
    row = {"method": method, "dtype": dt, "k": args.k, "load_avg_before": os.getloadavg()}
    samples: dict[str, list[dict]] = {t: [] for t in args.tools}
    inputs = [Path(m["model"]) for m in recipe["models"]] + ([Path(recipe["base_model"])] if "base_model" in recipe
                                                             else [])
    for r in range(args.repeats):  # alternate the order so neither tool always runs second
        for tool in (args.tools if r % 2 == 0 else args.tools[::-1]):
            res = _run(tool, recipe, work, inputs)
            samples[tool].append(res)
            print(f"{method:6s} {dt:4s} {tool:8s} wall {res['wall_s']:7.1f}s  "
                  f"merge {res['merge_s']:7.1f}s  peak RSS {res['peak_rss_mb']:7.0f} MB", flush=True)
    for tool, got in samples.items():
        row[tool] = sorted(got, key=lambda x: x["wall_s"])[len(got) // 2] | {
            "wall_s_samples": [round(x["wall_s"], 3) for x in got]}
    row["load_avg_after"] = os.getloadavg()
    row["diff_vs_mergekit"] = _compare(work / "out_mergekit", work / "out_deltakit")
    _ratios(args, row, work)
    return row


def _ratios(args, row: dict, work: Path) -> None:
    if "deltakit_exact" in args.tools:
        row["diff_vs_mergekit_exact_ties"] = _compare(work / "out_mergekit", work / "out_deltakit_exact")
        row["time_ratio_wall_exact"] = row["deltakit_exact"]["wall_s"] / row["mergekit"]["wall_s"]
    if "deltakit_nofsync" in args.tools:
        row["time_ratio_wall_nofsync"] = row["deltakit_nofsync"]["wall_s"] / row["mergekit"]["wall_s"]
        print(f"  -> without fsync (mergekit's durability): time ratio {row['time_ratio_wall_nofsync']:.2f}")
    row["time_ratio_wall"] = row["deltakit"]["wall_s"] / row["mergekit"]["wall_s"]
    row["time_ratio_merge"] = row["deltakit"]["merge_s"] / row["mergekit"]["merge_s"]
    row["rss_ratio"] = row["deltakit"]["peak_rss_mb"] / row["mergekit"]["peak_rss_mb"]
    print(f"  -> time ratio {row['time_ratio_wall']:.2f} (wall) {row['time_ratio_merge']:.2f} (merge), "
          f"RSS ratio {row['rss_ratio']:.2f}, max|diff| {row['diff_vs_mergekit'].get('max_abs_diff')}", flush=True)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] == ["--child"]:
        _child(*argv[1:4])
        return 0
    args = _args(argv)
    cache = Path(args.cache)
    dirs = _generate(cache, args)
    if args.generate_only:
        return 0
    n_params = json.loads((next(iter(dirs.values()))[0].parent.parent / "params.json").read_text())["n_params"]
    import mergekit  # noqa: F401

    results = []
    for dt in args.dtypes:
        for method in args.methods:
            work = Path(args.out_root or cache / "runs") / f"{method}_{dt}"
            work.mkdir(parents=True, exist_ok=True)
            results.append(_row(args, method, dt, dirs[dt], work))
            shutil.rmtree(work, ignore_errors=True)
    out = {
        "what": "deltakit run_recipe vs mergekit run_merge, same YAML, subprocess per merge",
        "model": {"hidden": args.hidden, "layers": args.layers, "vocab": args.vocab, "n_params": n_params},
        "machine": machine_info("mergekit") | {
            "cpus": os.cpu_count(), "note": "load averages before / after each row in load_avg_*; median of "
                                            "--repeats runs"},
        "repeats": args.repeats, "out_root": args.out_root or str(cache / "runs"),
        "results": results,
    }
    write_json(args.out, out)
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
