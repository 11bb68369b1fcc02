"""QLoRA / LQ-LoRA on CPU: a LoRA trained on SmolLM2 whose linear weights are fp32, int8, int4
or NF4 (deltakit.compress.qbase), against the full-precision base.

Per variant, in one process, one after the other (SmolLM2-135M-Instruct, bundled, offline):

* the bytes of the base's parameters and buffers (each tensor once: the tied embedding / head
  counts once) and the time to quantise it;
* the weight reconstruction error ``sqrt(sum |W - W'|^2 / sum |W|^2)`` over the quantised
  linears, where ``W'`` is the dequantised weight (plus ``s B A`` at step 0 for LQ-LoRA), and
  the same over the LoRA targets only (where LQ-LoRA acts);
* a LoRA (r=8, alpha=16 on q_proj and v_proj) trained ``--steps`` steps on ``--train-rows``
  sst2 rows as instructions (``deltakit.train.instruct.read_task_file``), ``--batch``, AdamW;
  the mean wall time per step and the first / last logged train loss;
* on ``--dev-rows`` sst2 dev rows, before and after training: the answer-token loss
  (``deltakit.train.gen_eval.answer_loss``, the labelled assistant tokens only) and, with
  ``--accuracy``, label accuracy by greedy generation (``evaluate_generation``, 3 new tokens).

Variants: ``fp32`` (no quantisation), ``int8`` / ``int4`` (symmetric, group 64, fp16 scales),
``nf4`` (QLoRA's NormalFloat, group 64) and ``nf4_lq`` (NF4 plus LQ-LoRA init, 3 iterations).
The machine is shared, so timings are indicative: the load average is recorded per variant.

    python bench/bench_qbase.py [--steps 30] [--batch 8] [--train-rows 240] [--dev-rows 96] [--threads 1]
                                [--accuracy]

The committed run (bench/results/qbase.json) used ``--steps 10 --batch 4 --train-rows 80
--dev-rows 24`` at a load average of 15-20 on 2 cores, where one SmolLM2 step of batch 8
took ~17 s: the full settings would take ~45 minutes there. Then ``--timing-rounds 4 --batch 4``
added the interleaved step timing (``interleaved_timing``) to the same file.
"""
from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
from pathlib import Path

import torch

from _common import DEFAULT_DATA, RESULTS, Log, load_avg, machine_info, timer, write_json, write_text

from deltakit import LoraConfig, attach, fit
from deltakit.compress.qbase import QuantConfig, base_bytes, lq_lora, quantize_base
from deltakit.core.layer import DeltaLayer
from deltakit.io.models import load_causal_lm
from deltakit.train.gen_eval import answer_loss, evaluate_generation
from deltakit.train.instruct import make_instruction_loader, read_task_file

OUT = RESULTS / "qbase.json"
VARIANTS = {"fp32": None, "int8": QuantConfig(bits=8), "int4": QuantConfig(bits=4),
            "nf4": QuantConfig(bits=4, scheme="nf4"), "nf4_lq": QuantConfig(bits=4, scheme="nf4")}
LORA = LoraConfig(r=8, alpha=16, targets=("q_proj", "v_proj"))


def build(variant: str, lq_iterations: int):
    """(model, tokenizer, adapter, figures) for one variant, the LoRA attached."""
    model, tok = load_causal_lm("smollm2")
    model.eval()
    fp32_bytes = base_bytes(model)
    cfg = VARIANTS[variant]
    if cfg is None:
        return model, tok, attach(model, LORA), {"bytes": fp32_bytes, "fp32_bytes": fp32_bytes, "quantise_s": 0.0,
                                                 "weight_error": 0.0, "weight_error_lora_targets": 0.0}
    linears = {n: m.weight for n, m in model.named_modules()
               if isinstance(m, torch.nn.Linear) and m is not model.get_output_embeddings()}
    t = timer()
    if variant.endswith("_lq"):
        adapter, _ = lq_lora(model, LORA, cfg, iterations=lq_iterations)
    else:
        quantize_base(model, cfg)
        adapter = attach(model, LORA)
    seconds = t()
    lora_paths = {p for p, _ in adapter.deltas()}
    figures = {"bytes": base_bytes(model), "fp32_bytes": fp32_bytes, "quantise_s": seconds,
               "weight_error": _weight_error(model, adapter, linears),
               "weight_error_lora_targets": _weight_error(model, adapter, {p: w for p, w in linears.items()
                                                                          if p in lora_paths}),
               "bits_per_weight": cfg.bits_per_weight(),
               "quant": {"bits": cfg.bits, "scheme": cfg.scheme, "group_size": cfg.group_size}}
    return model, tok, adapter, figures


@torch.no_grad()
def _weight_error(model, adapter, originals: dict) -> float:
    """Relative Frobenius error of the dequantised linears (plus the LoRA at step 0) against W."""
    lora = dict(adapter.deltas())
    num = den = 0.0
    for path, w in originals.items():
        layer = model.get_submodule(path)
        q = layer.base if isinstance(layer, DeltaLayer) else layer
        approx = q.dequantize(torch.float32)
        if path in lora:
            approx = approx + lora[path].product()
        num += float((w.float() - approx).pow(2).sum())
        den += float(w.float().pow(2).sum())
    return math.sqrt(num / den)


def evaluate(model, tok, dev: list, accuracy: bool) -> dict:
    """Answer-token loss (one forward per batch); label accuracy by generation only when asked
    (it costs about two more forwards per batch, too much on a crowded machine)."""
    loader = make_instruction_loader(dev, tok, batch_size=12, max_length=160)
    out = {"answer_loss": answer_loss(model, loader)["loss"]}
    if accuracy:
        gen = evaluate_generation(model, tok, dev, task="sst2", max_new_tokens=3, batch_size=12)
        out.update(accuracy=gen["accuracy"], unmapped=gen["unmapped"])
    return out


def train(model, tok, examples: list, steps: int, lr: float, batch: int) -> dict:
    loader = make_instruction_loader(examples, tok, batch_size=batch, max_length=160, shuffle=True)
    t = timer(None)
    res = fit(model, loader, lr=lr, max_steps=steps, log_every=max(1, steps // 6), progress=False, seed=0)
    seconds = t()
    losses = [h["loss"] for h in res.history if "loss" in h]
    return {"steps": res.steps, "step_s": round(seconds / max(1, res.steps), 3), "train_loss_first": losses[0],
            "train_loss_last": losses[-1], "train_losses": losses}


def run_variant(variant: str, args, train_rows: list, dev: list, log: Log) -> dict:
    model, tok, adapter, row = build(variant, args.lq_iterations)
    row["load_avg_start"] = load_avg()
    log(f"{variant}: {row['bytes'] / 2**20:.1f} MiB base (fp32 {row['fp32_bytes'] / 2**20:.1f}), weight error "
        f"{row['weight_error']:.4f} (LoRA targets {row['weight_error_lora_targets']:.4f}), quantised in "
        f"{row['quantise_s']:.1f}s")
    row["before"] = evaluate(model, tok, dev, args.accuracy)
    log(f"{variant}: before {row['before']}")
    row["train"] = train(model, tok, train_rows, args.steps, args.lr, args.batch)
    log(f"{variant}: train {row['train']['step_s']}s/step, loss {row['train']['train_loss_first']:.3f} -> "
        f"{row['train']['train_loss_last']:.3f}")
    row["after"] = evaluate(model, tok, dev, args.accuracy)
    row["load_avg_end"] = load_avg()
    log(f"{variant}: after {row['after']}")
    return row


def interleaved_timing(names: list[str], examples: list, steps: int, batch: int, log: Log) -> dict:
    """Train-step time of each variant on one fixed batch, the variants interleaved step by step
    (round ``i`` times each once, after a warm-up round), so another user's load hits them alike:
    the median seconds and the median of the per-round ratios to fp32."""
    built = {v: build(v, 1)[:3] for v in names}
    tok = built[names[0]][1]
    fixed = next(iter(make_instruction_loader(examples, tok, batch_size=batch, max_length=160)))
    opts = {v: torch.optim.AdamW(list(ad.parameters()), lr=1e-4) for v, (_, _, ad) in built.items()}
    times: dict[str, list[float]] = {v: [] for v in names}
    for i in range(steps + 1):
        for v in names:
            model = built[v][0].train()
            t = timer(None)
            model(**fixed).loss.backward()
            opts[v].step()
            opts[v].zero_grad(set_to_none=True)
            if i:
                times[v].append(t())
        if i:
            log(f"timing round {i}: " + ", ".join(f"{v} {times[v][-1]:.2f}s" for v in names))
    out = {v: {"median_s": round(statistics.median(ts), 3)} for v, ts in times.items()}
    if "fp32" in times:
        for v, ts in times.items():
            out[v]["ratio_to_fp32"] = round(statistics.median(a / b for a, b in zip(ts, times["fp32"])), 3)
    return {"steps": steps, "batch": batch, "load_avg": load_avg(), "variants": out}


def markdown(results: dict) -> str:
    st, lora = results["settings"], results["settings"]["lora"]
    lines = ["# QLoRA / LQ-LoRA on SmolLM2-135M-Instruct (sst2)", "",
             f"LoRA r={lora['r']}, alpha={lora['alpha']} on {', '.join(lora['targets'])}; {st['steps']} AdamW steps "
             f"(lr {st['lr']}, batch {st['batch']}) on {st['train_rows']} sst2 train rows as instructions; answer-token "
             f"loss on {st['dev_rows']} dev rows before and after; LQ-LoRA init with {st['lq_iterations']} "
             "iterations (its time is in 'quantise s'). Base MiB: every parameter and buffer once, measured with "
             "the LoRA attached (its 1.8 MiB included; the tied embedding/head, 108 MiB, stays fp32). Weight error: relative Frobenius error of the dequantised "
             "linears (plus the LoRA at step 0), over all quantised linears / over the LoRA targets.", "",
             f"Machine: {results['machine']['cpu']}, {results['machine']['logical_cpus']} CPUs, torch "
             f"{results['machine']['torch']}, {results['settings']['threads']} thread(s); load average at start "
             f"{results['machine']['load_avg']} (shared machine: timings are indicative).", "",
             "| base | base MiB | bits/weight | weight error (all / LoRA targets) | quantise s | step s "
             "| train loss first -> last | answer loss before -> after | accuracy before -> after | load (1 min) |",
             "|---|---:|---:|---|---:|---:|---|---|---|---:|"]
    for name, r in results["variants"].items():
        b, a, t = r["before"], r["after"], r["train"]
        acc = f"{b['accuracy']:.3f} -> {a['accuracy']:.3f}" if "accuracy" in b else "not run"
        lines.append(f"| {name} | {r['bytes'] / 2**20:.1f} | {r.get('bits_per_weight', 32)} | {r['weight_error']:.4f} / "
                     f"{r['weight_error_lora_targets']:.4f} "
                     f"| {r['quantise_s']:.1f} | {t['step_s']:.2f} | {t['train_loss_first']:.3f} -> "
                     f"{t['train_loss_last']:.3f} | {b['answer_loss']:.3f} -> {a['answer_loss']:.3f} | "
                     f"{acc} | {r['load_avg_start'][0]} |")
    if "timing" in results:
        tm = results["timing"]
        lines += ["", f"Interleaved train-step timing ({tm['steps']} rounds, batch {tm['batch']}, one fixed batch, "
                      f"load at the end {tm['load_avg']}): median seconds per step and median paired ratio to fp32.",
                  "", "| base | step s | / fp32 |", "|---|---:|---:|"]
        lines += [f"| {v} | {r['median_s']:.2f} | {r.get('ratio_to_fp32', float('nan')):.2f} |"
                  for v, r in tm["variants"].items()]
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", default=str(OUT))
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--train-rows", type=int, default=240)
    p.add_argument("--dev-rows", type=int, default=96)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--accuracy", action="store_true", help="also label accuracy by greedy generation (slower)")
    p.add_argument("--lq-iterations", type=int, default=3)
    p.add_argument("--threads", type=int, default=1, help="torch threads (1 is faster on a crowded 2-core box)")
    p.add_argument("--variants", default=",".join(VARIANTS))
    p.add_argument("--data", default=DEFAULT_DATA)
    p.add_argument("--timing-rounds", type=int, default=0,
                   help="only add interleaved step timing of fp32/int8/int4/nf4 (N rounds) to an existing --out")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    log = Log()
    data = Path(args.data) / "sst2"
    train_rows = read_task_file(data / "train.tsv", "sst2", max_rows=args.train_rows, seed=0)
    dev = read_task_file(data / "dev.tsv", "sst2", max_rows=args.dev_rows, seed=0)
    if args.timing_rounds:
        results = json.loads(Path(args.out).read_text())
        results["timing"] = interleaved_timing(["fp32", "int8", "int4", "nf4"], train_rows, args.timing_rounds,
                                               args.batch, log)
        write_json(args.out, results)
        write_text(Path(args.out).with_suffix(".md"), markdown(results))
        return 0
    results = {"machine": machine_info("transformers"), "variants": {},
               "settings": {"model": "smollm2", "lora": LORA.to_dict(), "steps": args.steps, "lr": args.lr,
                            "train_rows": len(train_rows), "dev_rows": len(dev), "batch": args.batch,
                            "lq_iterations": args.lq_iterations, "threads": args.threads}}
    for v in args.variants.split(","):
        results["variants"][v] = run_variant(v, args, train_rows, dev, log)
        write_json(args.out, results)
    write_text(Path(args.out).with_suffix(".md"), markdown(results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
