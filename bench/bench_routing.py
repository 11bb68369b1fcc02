"""Routing among a library of adapters: SmolLM2 with its per-task LoRAs (bench/llm_tasks.py).

Every system scores every task's dev subsample: the base zero-shot, each task with its own
adapter (the oracle), a uniform merge and a TIES merge of all adapters (the merge engine), Arrow
at top-1 and top-2 (prototypes from the library index), MBC clusters (one merged adapter per
cluster, Arrow among them), retrieval routing (AdapterSwap), LoraHub with 5 and 20 examples;
then leave-one-task-out (the task's own adapter removed from the library) for the systems that
can route to other tasks' adapters. Plus routing overhead in tokens/s against one adapter.
Writes ``bench/results/routing.{json,md}`` (``--quick``: under runs/routing).

    python bench/bench_routing.py [--quick] [--systems base oracle arrow_top1 ...]
    deltakit bench routing [--quick]
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from pathlib import Path

import torch

from _common import HERE, RESULTS, Log, load_avg, machine_info, read_json, timer, write_json, write_text
from routing.config import QUICK, SYSTEMS, Config
from routing.report import markdown, summary
from routing.setup import build
from routing.systems import LAST_OUTPUTS, SYSTEM_FNS, pool_for


def _run_system(w, cfg: Config, system: str, log: Log) -> dict:
    fn = SYSTEM_FNS[system.removeprefix("loo_")]
    out = {}
    for t in cfg.tasks:
        elapsed = timer()
        r = fn(w, cfg, t, pool_for(w, t, system.startswith("loo_")))
        out[t] = {**r, "seconds": elapsed(), "load": load_avg()[0], "first_answers": list(LAST_OUTPUTS)}
        log(f"{system} {t}: {r['accuracy']:.3f} ({out[t]['seconds']:.0f} s)"
            + (f" usage {r['usage']}" if "usage" in r else ""))
    return out


def _order(system: str) -> int:
    return SYSTEMS.index(system) if system in SYSTEMS else len(SYSTEMS)


def _kept(cfg: Config, path: Path, log: Log) -> dict:
    """Scores of an earlier run with the same settings (systems aside), to resume it."""
    if not path.is_file():
        return {}
    old = read_json(path)
    # what decides every system's scores alike; the routers' own knobs only touch their own systems
    scoring = ("adapters", "tasks", "n_dev", "max_new_tokens", "batch_size", "seed")
    now = json.loads(json.dumps(dataclasses.asdict(cfg)))
    if any(old["config"].get(k) != now[k] for k in scoring):
        raise SystemExit(f"--resume: {path} was scored with other settings ({', '.join(scoring)}); move it away "
                         "or drop --resume")
    log(f"resuming: keeping {sorted(old['scores'])} from {path}")
    return old["scores"]


def run(cfg: Config, out_dir: Path, log: Log, notes: list[str] | None = None, resume: bool = False,
        timing: bool = True) -> dict:
    torch.set_num_threads(cfg.threads)
    elapsed = timer()
    res = {"config": dataclasses.asdict(cfg), "machine": machine_info("transformers"), "load_start": load_avg(),
           "scores": _kept(cfg, out_dir / "routing.json", log) if resume else {}}
    w = build(cfg, log)
    for s in [s for s in cfg.systems if s not in res["scores"]]:
        if s.removeprefix("loo_") not in SYSTEM_FNS:
            raise SystemExit(f"--systems: {s!r} is not implemented; expected among {sorted(SYSTEM_FNS)} (or loo_ ones)")
        res["scores"][s] = _run_system(w, cfg, s, log)
        res["scores"] = {k: res["scores"][k] for k in sorted(res["scores"], key=_order)}
        res["summary"] = summary(res)
        write_json(out_dir / "routing.json", res)   # after every system: a stopped run keeps what it did
    from routing.systems import overhead_settings
    from routing.overhead import overhead
    if timing:
        res["overhead"] = overhead(w, cfg, overhead_settings(w, cfg), log)
    res.update(load_end=load_avg(), wall_min=round(elapsed() / 60, 1), summary=summary(res))
    write_json(out_dir / "routing.json", res)
    write_text(out_dir / "routing.md", markdown(res, notes))
    log(f"wrote {out_dir / 'routing.json'} and .md\n" + markdown(res, notes))
    return res


def merge_results(cfg: Config, out: Path, others: list[Path], log: Log, notes: list[str] | None = None) -> int:
    """Fold the systems of other runs (two processes on the two cores, each its own library) into
    ``out/routing.json``; the scoring settings must match. Rewrites the report."""
    res = read_json(out / "routing.json")
    for p in others:
        _kept(Config(**{k: tuple(v) if isinstance(v, list) else v for k, v in read_json(p)["config"].items()}),
              out / "routing.json", log)  # same scoring settings, else a one-line exit
        extra = read_json(p)
        for s, v in extra["scores"].items():
            res["scores"].setdefault(s, v)
        res.setdefault("merged_from", []).append({"file": str(p), "systems": sorted(extra["scores"]),
                                                  "load_start": extra["load_start"], "config": extra["config"]})
    res["scores"] = {k: res["scores"][k] for k in sorted(res["scores"], key=_order)}
    res["summary"] = summary(res)
    if notes is not None:
        res["notes"] = notes
    write_json(out / "routing.json", res)
    write_text(out / "routing.md", markdown(res, res.get("notes")))
    log(f"merged {len(others)} run(s) into {out / 'routing.json'}\n" + markdown(res))
    return 0


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--quick", action="store_true", help="smoke run: 3 tasks, 8 dev rows, results under runs/routing")
    p.add_argument("--systems", nargs="+", default=None, help=f"which systems (default all: {' '.join(SYSTEMS)})")
    p.add_argument("--n-dev", type=int, default=None, help="dev rows per task (default 50)")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default 2)")
    p.add_argument("--resume", action="store_true", help="keep the systems an earlier run with the same settings scored")
    p.add_argument("--no-overhead", action="store_true", help="skip the tokens/s measurement")
    p.add_argument("--out", default=None, help="results directory (default bench/results; --quick: runs/routing)")
    p.add_argument("--library", default=None, help="where the benchmark builds its library (default runs/routing/library;"
                                                   " two runs at once need two)")
    p.add_argument("--merge-from", nargs="+", default=[], metavar="JSON",
                   help="add the systems scored in these routing.json files (same scoring settings) and rewrite the report")
    p.add_argument("--notes", default=None, metavar="FILE",
                   help="with --merge-from: a markdown file of reading notes kept in the JSON and printed under the table")
    a = p.parse_args(argv)
    over = {k: v for k, v in (("systems", tuple(a.systems) if a.systems else None), ("n_dev", a.n_dev),
                              ("threads", a.threads), ("library", a.library)) if v is not None}
    cfg = Config(**{**(QUICK if a.quick else {}), **over})
    out = Path(a.out) if a.out else HERE.parent / "runs" / "routing" if a.quick else RESULTS
    if a.merge_from:
        notes = Path(a.notes).read_text().splitlines() if a.notes else None
        return merge_results(cfg, out, [Path(p) for p in a.merge_from], Log(), notes)
    run(cfg, out, Log(), resume=a.resume, timing=not a.no_overhead)
    return 0


if __name__ == "__main__":
    sys.exit(main())
