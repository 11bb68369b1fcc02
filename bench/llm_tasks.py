"""Quality on real data: SmolLM2-135M-Instruct zero-shot vs a LoRA SFT adapter per text task.

For each of the 8 GLUE-style tasks in ``<data>/<task>/{train,dev}.tsv`` (default
``/work/shared/data/text``, env ``DELTAKIT_GLUE_DIR`` or ``--data-dir``), every task read as
an instruction task through :data:`deltakit.train.instruct.TASKS` (one prompt per task, the
answer a word such as "positive" / "negative"):

* **zero-shot**: the base model with the task's prompt, greedy generation on a seeded dev
  subsample, the answer mapped to a label by :func:`deltakit.train.gen_eval.answer_label`
  (an answer naming no label word is *unmapped* and counts as wrong);
* **LoRA SFT**: r=16 on every linear layer of the blocks (attention q/k/v/o and MLP
  gate/up/down), trained on a seeded train subsample (one pass: ``steps x batch`` rows),
  the loss on the answer tokens only, bf16 autocast, then scored the same way on the same
  dev rows;
* **majority class**: the most frequent label of the whole train file, scored on those rows.

Every setting is fixed up front and the same for all tasks (no tuning on dev). The adapters
are saved under ``--out`` (default ``runs/llm_tasks`` in the repository, not committed), one
deltakit adapter directory per task, ``<out>/<task>/``, with ``<out>/index.json`` listing
``{task, path, dev_accuracy, zero_shot_accuracy, settings}``: the library of adapters that
routing and compression work on. A rerun with the same settings reuses the tasks already in
the index (delete the directory to retrain); everything is seeded, so a retrain reproduces them.

Writes ``bench/results/llm_tasks.{json,md}`` (``--quick``: a smoke run, tiny sizes, results
beside the adapters under ``--out``), with the machine and its load averages beside the figures.

    python bench/llm_tasks.py [--quick] [--tasks sst2,rte] [--out runs/llm_tasks]
    deltakit bench llm-tasks [--quick]
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from collections import Counter
from dataclasses import dataclass, replace
from pathlib import Path

import torch

from _common import DEFAULT_DATA, HERE, RESULTS, Log, load_avg, machine_info, timer, write_json, write_text

TASK_NAMES = ("sst2", "cola", "mrpc", "rte", "qnli", "subj", "trec", "ag_news")
LLAMA_LINEAR = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
DEFAULT_OUT = HERE.parent / "runs" / "llm_tasks"


@dataclass(frozen=True)
class Settings:
    """What decides an adapter and its scores (recorded in every adapter and in the index).

    Sized so all 8 tasks finish on a 2-core machine shared with other jobs (load 15-22 when it was
    run; 30 steps and 100 dev rows per task needed ~2 h there): on 2 idle cores a step of 8 rows
    (65-105 tokens each with the chat template) takes 2-3.5 s and greedy scoring of 32 dev rows
    ~5 s, so an idle run takes ~10 min. More steps help: raise ``steps`` on an idle machine."""

    model: str = "smollm2"
    steps: int = 16
    batch_size: int = 8
    lr: float = 2e-3
    warmup_steps: int = 2
    r: int = 16
    alpha: float = 32.0
    targets: tuple[str, ...] = LLAMA_LINEAR
    max_length: int = 256
    n_dev: int = 50
    max_new_tokens: int = 8
    autocast: str = "bf16"
    seed: int = 0

    @property
    def n_train(self) -> int:
        return self.steps * self.batch_size


QUICK = Settings(steps=2, batch_size=4, n_dev=8, max_new_tokens=4)


# ----------------------------------------------------------------------------- one task
def _read(data_dir: Path, task: str, s: Settings) -> dict:
    """Train subsample, dev subsample, and the majority label of the whole train file."""
    from deltakit.train.instruct import read_task_file

    train_file, dev_file = data_dir / task / "train.tsv", data_dir / task / "dev.tsv"
    every = read_task_file(train_file, task)
    majority = Counter(ex["label"] for ex in every).most_common(1)[0][0]
    return {"train": read_task_file(train_file, task, max_rows=s.n_train, seed=s.seed),
            "dev": read_task_file(dev_file, task, max_rows=s.n_dev, seed=s.seed),
            "majority": majority, "files": (train_file, dev_file)}


def _score(model, tok, dev: list[dict], task: str, s: Settings) -> dict:
    from deltakit.train.gen_eval import evaluate_generation

    elapsed = timer(1)
    r = evaluate_generation(model, tok, dev, task=task, max_new_tokens=s.max_new_tokens, batch_size=16)
    return {"accuracy": round(r["accuracy"], 4), "unmapped_rate": round(r["unmapped"] / len(dev), 4),
            "exact_match": round(r["exact_match"], 4), "seconds": elapsed(), "outputs": r["outputs"][:5]}


def _train(model, tok, task: str, train: list[dict], s: Settings, log):
    """Attach a fresh LoRA named ``task``, fit it on the answer tokens; (adapter, fit result, report)."""
    import deltakit as dk
    from deltakit.train import fit
    from deltakit.train.instruct import make_instruction_loader

    torch.manual_seed(s.seed)  # the LoRA A init
    adapter = dk.attach(model, dk.LoraConfig(r=s.r, alpha=s.alpha, targets=s.targets), name=task)
    loader = make_instruction_loader(train, tok, batch_size=s.batch_size, max_length=s.max_length,
                                     shuffle=True, seed=s.seed)
    log(f"[{task}] training {adapter.num_parameters():,} LoRA parameters, {s.steps} steps x {s.batch_size} rows; "
        f"train: {loader.dataset.report}")
    result = fit(model, loader, lr=s.lr, max_steps=s.steps, warmup_steps=s.warmup_steps, schedule="linear",
                 seed=s.seed, log_every=10, autocast={"bf16": torch.bfloat16, "fp32": None}[s.autocast])
    return adapter, result, loader.dataset.report


def run_task(model, tok, task: str, s: Settings, data_dir: Path, out: Path, log) -> dict:
    """Zero-shot, then LoRA SFT, on one task; saves the adapter to ``out/<task>`` and returns its row."""
    from deltakit.io.adapter_files import save_adapter
    from deltakit.train.data import provenance

    d = _read(data_dir, task, s)
    majority = sum(ex["label"] == d["majority"] for ex in d["dev"]) / len(d["dev"])
    log(f"[{task}] {len(d['train'])} train / {len(d['dev'])} dev rows; zero-shot scoring")
    zero = _score(model, tok, d["dev"], task, s)
    log(f"[{task}] zero-shot accuracy {zero['accuracy']:.3f} (unmapped {zero['unmapped_rate']:.1%}), "
        f"{zero['seconds']} s; e.g. {zero['outputs'][:3]}")
    elapsed = timer(1)
    adapter, result, report = _train(model, tok, task, d["train"], s, log)
    train_s = elapsed()
    lora = _score(model, tok, d["dev"], task, s)
    log(f"[{task}] LoRA accuracy {lora['accuracy']:.3f} (unmapped {lora['unmapped_rate']:.1%}), trained in "
        f"{train_s} s")
    data = [provenance(f, split, d[split]) for split, f in zip(("train", "dev"), d["files"])]
    row = {"task": task, "majority_accuracy": round(majority, 4), "zero_shot": zero, "lora": lora,
           "train_examples": len(d["train"]), "steps": result.steps, "train_seconds": train_s,
           "train_loss": result.metrics.get("train_loss"), "truncated": report.truncated,
           "answer_lost": len(report.no_target_left), "adapter": task,
           "adapter_params": adapter.num_parameters(), "load_avg": load_avg()}
    # the row travels in the adapter's own manifest, so a rerun can reuse it (see _cached)
    training = {"steps": result.steps, "metrics": {"dev_accuracy": lora["accuracy"], "train_loss":
                                                   result.metrics.get("train_loss")},
                "data": data, "settings": _settings_record(s, task), "bench_row": row}
    save_adapter(adapter, out / task, training=training)
    adapter.detach()
    return row


def _settings_record(s: Settings, task: str) -> dict:
    return {**dataclasses.asdict(s), "targets": list(s.targets), "task": "causal-lm", "task_prompt": task,
            "method": "lora", "n_train": s.n_train}


# ----------------------------------------------------------------------------- library index, report
def _cached(out: Path, task: str, s: Settings) -> dict | None:
    """The row of a task whose saved adapter was made with these settings (from its manifest)."""
    manifest = out / task / "adapter.json"
    if not manifest.is_file():
        return None
    training = json.loads(manifest.read_text()).get("training") or {}
    same = training.get("settings") == json.loads(json.dumps(_settings_record(s, task)))
    return training.get("bench_row") if same else None


def _write_index(out: Path, rows: list[dict], s: Settings) -> None:
    entries = [{"task": r["task"], "path": r["adapter"], "dev_accuracy": r["lora"]["accuracy"],
                "zero_shot_accuracy": r["zero_shot"]["accuracy"], "settings": _settings_record(s, r["task"])}
               for r in rows]
    write_json(out / "index.json", {"model": s.model, "method": "lora", "adapters": entries,
                                    "note": "paths are relative to this file's directory; made by "
                                            "bench/llm_tasks.py (seeded, reproducible)"})


def _pct(x: float) -> str:
    return f"{100 * x:.1f}"


def markdown(res: dict) -> str:
    """The results table (accuracies in %), the mean row, and the machine beside them."""
    rows, s = res["tasks"], res["settings"]
    head = ("| task | majority | zero-shot | unmapped | LoRA | LoRA - zero-shot | train rows / steps | "
            "train s | load (1 min) |\n|---|---|---|---|---|---|---|---|---|\n")
    lines = [f"| {r['task']} | {_pct(r['majority_accuracy'])} | {_pct(r['zero_shot']['accuracy'])} | "
             f"{_pct(r['zero_shot']['unmapped_rate'])} | {_pct(r['lora']['accuracy'])} | "
             f"{100 * (r['lora']['accuracy'] - r['zero_shot']['accuracy']):+.1f} | {r['train_examples']} / "
             f"{r['steps']} | {r['train_seconds']:.0f} | {r['load_avg'][0]} |" for r in rows]
    mean = {k: sum(f(r) for r in rows) / len(rows) for k, f in (
        ("maj", lambda r: r["majority_accuracy"]), ("zero", lambda r: r["zero_shot"]["accuracy"]),
        ("unm", lambda r: r["zero_shot"]["unmapped_rate"]), ("lora", lambda r: r["lora"]["accuracy"]))}
    lines.append(f"| **mean** | {_pct(mean['maj'])} | {_pct(mean['zero'])} | {_pct(mean['unm'])} | "
                 f"{_pct(mean['lora'])} | {100 * (mean['lora'] - mean['zero']):+.1f} | | "
                 f"{sum(r['train_seconds'] for r in rows):.0f} | |")
    m = res["machine"]
    return (f"# SmolLM2-135M-Instruct: zero-shot vs LoRA SFT on {len(rows)} text tasks\n\n"
            f"Dev accuracy (%) on a seeded subsample of {s['n_dev']} dev rows per task (fewer where the dev "
            f"file is smaller), greedy answers of up to {s['max_new_tokens']} tokens mapped to labels; "
            "*unmapped* is the share of zero-shot answers naming no label word (counted wrong). "
            f"LoRA: r={s['r']}, alpha={s['alpha']} on {', '.join(s['targets'])}; {s['steps']} steps x "
            f"{s['batch_size']} rows (one pass over a seeded train subsample), lr {s['lr']}, linear decay, "
            f"{s['warmup_steps']} warm-up steps, {s['autocast']} autocast, loss on answer tokens only, "
            f"seed {s['seed']}. Majority: the most frequent label of the whole train file.\n\n"
            + head + "\n".join(lines) + "\n\n" + res.get("notes", "") + res.get("context", "") +
            f"\nMachine: {m['cpu']}, {m['logical_cpus']} logical CPUs, torch {m['torch']}, transformers "
            f"{m.get('transformers')}; {s.get('workers', 1)} worker process(es) x {s.get('threads')} torch "
            "thread(s), tasks split between them; load average "
            f"(1/5/15 min) at start {m['load_avg']}, at end {res['load_avg_end']}. "
            f"Wall time {res['seconds'] / 60:.1f} min (model load, scoring and training).\n"
            "Made by `python bench/llm_tasks.py` (`deltakit bench llm-tasks`).\n")


# ----------------------------------------------------------------------------- driver
def _notes(rows: list[dict]) -> str:
    """Where LoRA did not beat zero-shot, or did not beat the majority class: said, not hidden."""
    out = []
    for r in rows:
        lora, zero, maj = r["lora"]["accuracy"], r["zero_shot"]["accuracy"], r["majority_accuracy"]
        if lora <= zero:
            out.append(f"- {r['task']}: LoRA ({_pct(lora)}) does NOT beat zero-shot ({_pct(zero)}).")
        elif lora <= maj + 0.02:
            out.append(f"- {r['task']}: LoRA beats zero-shot but stays within 2 points of the majority class "
                       f"({_pct(maj)}): at this budget it learnt little beyond the label prior.")
        if r.get("truncated"):
            out.append(f"- {r['task']}: {r['truncated']} of {r['train_examples']} training examples were cut at "
                       f"max_length tokens ({r['answer_lost']} of them lost the answer, so taught nothing).")
    return ("Notes:\n" + "\n".join(out) + "\n") if out else ""


# longest prompts first, so the two workers' shares come out about even
COST_ORDER = ("qnli", "rte", "mrpc", "ag_news", "cola", "sst2", "subj", "trec")


def work(tasks: tuple[str, ...], s: Settings, data_dir: Path, out: Path, threads: int) -> list[dict]:
    """One worker: load the model once, then each task (reusing a saved adapter made with ``s``)."""
    from deltakit.io.models import load_causal_lm

    torch.set_num_threads(threads)
    log = Log()
    model, tok = load_causal_lm(s.model)
    model.eval()  # dropout off for scoring; fit switches to train mode and back
    rows = []
    for task in tasks:
        row = _cached(out, task, s)
        if row is not None:
            log(f"[{task}] reusing {out / task} (its manifest has the same settings)")
        rows.append(row or run_task(model, tok, task, s, data_dir, out, log))
    return rows


def _shares(tasks: tuple[str, ...], workers: int) -> list[tuple[str, ...]]:
    ordered = sorted(tasks, key=lambda t: COST_ORDER.index(t))
    return [tuple(ordered[i::workers]) for i in range(workers) if ordered[i::workers]]


def run(tasks: tuple[str, ...], s: Settings, data_dir: Path, out: Path, results: Path, workers: int,
        threads: int, report_only: bool = False) -> dict:
    """Tasks spread over ``workers`` processes of ``threads`` torch threads; index and report at the end."""
    import concurrent.futures as cf
    import multiprocessing as mp

    log, elapsed = Log(), timer(1)
    info = machine_info("transformers", "deltakit")
    log(f"SmolLM2 zero-shot vs LoRA SFT on {', '.join(tasks)}; {workers} worker(s) x {threads} thread(s); "
        f"adapters to {out}")
    shares = _shares(tasks, workers)
    if report_only:
        done = [r for r in (_cached(out, t, s) for t in tasks) if r is not None]
        log(f"report only: {len(done)} of {len(tasks)} tasks have an adapter made with these settings")
    elif len(shares) == 1:
        done = work(shares[0], s, data_dir, out, threads)
    else:
        with cf.ProcessPoolExecutor(len(shares), mp_context=mp.get_context("spawn")) as pool:
            futures = [pool.submit(work, share, s, data_dir, out, threads) for share in shares]
            done = [row for f in futures for row in f.result()]
    rows = sorted(done, key=lambda r: tasks.index(r["task"]))
    _write_index(out, rows, s)
    res = {"settings": {**dataclasses.asdict(s), "n_train": s.n_train, "workers": workers, "threads": threads},
           "machine": info, "tasks": rows, "load_avg_end": load_avg(), "seconds": elapsed(),
           "data_dir": str(data_dir), "adapters": str(out)}
    res["notes"] = _notes(rows)
    write_json(results / "llm_tasks.json", res)
    write_text(results / "llm_tasks.md", markdown(res))
    log(f"wrote {results / 'llm_tasks.json'} and .md\n" + markdown(res))
    return res


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--quick", action="store_true", help="smoke run: tiny sizes, results under --out")
    p.add_argument("--tasks", default=",".join(TASK_NAMES), help="comma-separated tasks (default all 8)")
    p.add_argument("--data-dir", default=DEFAULT_DATA, help="GLUE-style task directories (default %(default)s)")
    p.add_argument("--out", default=None, help=f"adapter library directory (default {DEFAULT_OUT}, "
                                               "with --quick its 'quick' sibling)")
    p.add_argument("--report-only", action="store_true",
                   help="train nothing: write the index and report from the adapters already under --out")
    p.add_argument("--workers", type=int, default=2, help="worker processes, tasks split between them (default 2)")
    p.add_argument("--threads", type=int, default=1,
                   help="torch threads per worker (default 1: on a shared 2-core machine at load 15, one "
                        "worker of 2 OpenMP threads was over 10x slower than one of 1 thread)")
    p.add_argument("--steps", type=int, default=None, help=f"training steps of 8 rows (default {Settings.steps})")
    p.add_argument("--n-dev", type=int, default=None, help=f"dev rows scored per task (default {Settings.n_dev})")
    p.add_argument("--results", default=None, help="where llm_tasks.{json,md} go (default bench/results)")
    a = p.parse_args(argv)
    tasks = tuple(t for t in a.tasks.split(",") if t)
    if unknown := sorted(set(tasks) - set(TASK_NAMES)):
        p.error(f"--tasks: expected names among {list(TASK_NAMES)}, found {unknown}")
    out = Path(a.out) if a.out else DEFAULT_OUT.with_name("llm_tasks_quick" if a.quick else "llm_tasks")
    s = QUICK if a.quick else Settings()
    s = replace(s, **{k: v for k, v in (("steps", a.steps), ("n_dev", a.n_dev)) if v is not None})
    results = Path(a.results) if a.results else (out if a.quick else RESULTS)
    run(tasks, s, Path(a.data_dir), out, results, a.workers, a.threads, a.report_only)
    return 0


if __name__ == "__main__":
    sys.exit(main())
