"""Delta compression on real deltas: every codec at 4x-64x, the size-budget allocation, merges.

* **(a)** the bundled MiniLM fully fine-tuned on four text tasks (``sst2 qnli subj ag_news``
  from ``<data>/<task>/{train,dev}.tsv``; the merge-quality benchmark's fine-tuning settings
  and cache), each task's encoder delta ``finetuned - base`` compressed tensor by tensor by
  every registered compressor at each target ratio (its rate knob solved from planned bits;
  the ratio reported is the one measured on disk), decoded from the file and scored on dev
  with the task's own head;
* **(b)** SmolLM2 deltas: the per-task LoRA adapters of ``bench/llm_tasks.py`` (dense ``dW``
  per target), and full fine-tunes of the blocks' linear weights on the same rows
  (``compress/llm_full.py``, cached), compressed, added to the base and scored by generation;
* **(c)** task arithmetic over the four MiniLM deltas compressed at 16x, merged straight
  from the compressed files, against the same merge of the uncompressed deltas.

Encode / decode speeds are GB/s of fp32 delta processed, beside this machine's memcpy.
Writes ``bench/results/compress.{json,md,png}`` (``--quick``: under the cache directory).

    python bench/bench_compress.py [--quick] [--codecs topk svd ...] [--no-llm]
    python bench/bench_compress.py --add-llm-full   # part (b) full FT only, into the existing report
    deltakit bench compress [--quick]
"""
from __future__ import annotations

import argparse
import dataclasses
import sys
import time
from pathlib import Path

import torch

from _common import RESULTS, Log, load_avg, machine_info, timer
from compress.config import DEFAULT_CACHE, QUICK, Config, finetune_config
from compress.llm_full import FullSettings

QUICK_FULL = FullSettings(steps=2, lrs=(2e-5,), n_hold=4)  # --quick: a smoke run of the full fine-tune
from compress.encoders import Scorer, memcpy_gbps
from compress.report import write_report
from compress.sweep import merge_compressed, sweep_encoder


def _finetunes(cfg: Config, cache: Path, log: Log):
    """(tasks, base_state, tvs, heads, fine-tune info): cached full fine-tunes of MiniLM."""
    from deltakit.io.models import load_classifier
    from merge_quality.data import load_tasks
    from merge_quality.finetune import finetune

    fcfg = finetune_config(cfg)
    base, tok = load_classifier(fcfg.model, 2, seed=cfg.seed)
    base_state = {k: v.detach().clone() for k, v in base.state_dict().items()}
    tasks = load_tasks(fcfg, tok)
    tvs, heads, info = {}, {}, {}
    for t, td in tasks.items():
        tvs[t], heads[t], info[t] = finetune(fcfg, "full", td, base_state, cache, log)
    return tasks, base_state, tvs, heads, info


def _budget():
    """The size-budget allocator as the sweep calls it: ``budget(tv)(ratio, out)``."""
    from compress.budgeted import budget_for

    return budget_for


def run(quick: bool = False, llm: bool = True, **overrides) -> dict:
    out_dir = Path(overrides.pop("out_dir", None) or (Path(DEFAULT_CACHE) / "quick" if quick else RESULTS))
    cache = Path(overrides.pop("cache_dir", None) or DEFAULT_CACHE)
    cfg = Config(**({**QUICK, **overrides} if quick else overrides))
    torch.set_num_threads(cfg.threads)
    log, t0 = Log(), time.time()
    res = {"benchmark": "compress", "quick": quick, "config": dataclasses.asdict(cfg),
           "machine": machine_info() | {"load_start": load_avg()}, "timings": {}}
    res["memcpy_gbps"] = memcpy_gbps()
    log(f"compress bench: tasks {cfg.tasks}, ratios {cfg.ratios}; memcpy {res['memcpy_gbps']} GB/s")
    elapsed = timer()
    tasks, base_state, tvs, heads, info = _finetunes(cfg, cache, log)
    res["timings"]["finetune_s"] = elapsed()
    scorer = Scorer(finetune_config(cfg).model, base_state, cfg.seed)
    refs = {t: {"score": scorer.score(td, tvs[t], heads[t]), "metric": td.metric,
                "base_score": scorer.score(td, None, heads[t]), "labels": td.labels} for t, td in tasks.items()}
    res["encoder"] = {"reference": refs, "finetune": {t: {k: v for k, v in i.items() if k != "loss_history"}
                                                      for t, i in info.items()}}
    res["encoder"]["majority"] = _majority(cfg)
    log(f"uncompressed: {refs}")
    elapsed = timer()
    res["encoder"]["rows"] = sweep_encoder(cfg, tasks, tvs, heads, scorer, {t: r["score"] for t, r in refs.items()},
                                           log, _budget())
    res["timings"]["encoder_s"] = elapsed()
    elapsed = timer()
    res["merge"] = merge_compressed(cfg, tasks, tvs, heads, scorer, log)
    res["timings"]["merge_s"] = elapsed()
    if llm:
        from compress.llm import run_llm
        from compress.llm_full import run_llm_full
        res["llm"] = run_llm(cfg, log)
        res["llm_full"] = run_llm_full(cfg, log, cache, QUICK_FULL if quick else FullSettings())
    res["timings"]["total_s"] = round(time.time() - t0, 1)
    res["machine"]["load_end"] = load_avg()
    write_report(res, out_dir)
    log(f"wrote {out_dir / 'compress.json'}, .md, .png")
    return res


def add_llm_full(out_dir: Path | None = None, cache: Path | None = None) -> dict:
    """Part (b)'s full fine-tuning deltas added to an existing run's report (its config, torch
    threads and dev rows), leaving parts (a), (c) and the LoRA rows as they were measured."""
    from _common import read_json
    from compress.llm_full import run_llm_full

    out_dir = Path(out_dir or RESULTS)
    res = read_json(out_dir / "compress.json")
    cfg = Config(**{k: tuple(v) if isinstance(v, list) else v for k, v in res["config"].items()})
    torch.set_num_threads(cfg.threads)
    log = Log()
    log(f"(b-full) adding SmolLM2 full fine-tuning deltas to {out_dir / 'compress.json'}; load {load_avg()}")

    def save(partial: dict) -> None:  # after every task: a stopped run keeps the tasks it finished
        res["llm_full"] = partial
        res["timings"]["llm_full_s"] = partial["seconds"]
        write_report(res, out_dir)

    run_llm_full(cfg, log, Path(cache or DEFAULT_CACHE), on_task=save)
    log(f"wrote {out_dir / 'compress.json'}, .md, .png")
    return res


def _majority(cfg: Config) -> dict:
    from merge_quality.data import majority_baseline

    return majority_baseline(finetune_config(cfg))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="tiny sizes (smoke run; output under the cache)")
    p.add_argument("--codecs", nargs="+", default=None, help="only these compressors (default: all registered)")
    p.add_argument("--no-llm", action="store_true", help="skip part (b), the SmolLM2 deltas")
    p.add_argument("--add-llm-full", action="store_true",
                   help="only part (b)'s full fine-tuning deltas, added to the report already in --out-dir")
    p.add_argument("--cache-dir", default=None, help=f"fine-tune cache (default {DEFAULT_CACHE})")
    p.add_argument("--out-dir", default=None, help="where results go (default bench/results)")
    a = p.parse_args(argv)
    if a.add_llm_full:
        add_llm_full(a.out_dir, a.cache_dir)
        return 0
    over = {k: v for k, v in {"codecs": tuple(a.codecs) if a.codecs else None, "cache_dir": a.cache_dir,
                              "out_dir": a.out_dir}.items() if v is not None}
    run(quick=a.quick, llm=not a.no_llm, **over)
    return 0


if __name__ == "__main__":
    sys.exit(main())
