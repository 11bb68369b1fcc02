"""The merge-quality report: markdown tables, a summary, the plot, and refreshing a previous
full result with a partial rerun (``--methods``)."""
from __future__ import annotations

import json
import time
from collections.abc import Mapping
from pathlib import Path

from _common import Log, write_json, write_text

from .config import KINDS, TASK_METRIC
from .scoring import normalised
from .sweep import setting_label

__all__ = ["table", "plot", "write_report", "refresh_previous"]


def _norm_acc(dev: Mapping, ref: Mapping) -> float:
    """Mean over ALL tasks of merged / individual accuracy (a check on the metric-normalised score)."""
    return sum(dev[t]["accuracy"] / ref[t]["accuracy"] for t in dev) / len(dev)


def table(result: dict) -> str:
    tasks = result["config"]["tasks"]
    head = {"accuracy": "acc", "f1": "F1", "mcc": "MCC"}
    cols = [f"{t} {head[TASK_METRIC.get(t, 'accuracy')]}" for t in tasks]
    f = lambda x: "-" if x is None else f"{x:.3f}"  # noqa: E731
    lines = []
    for kind in KINDS:
        r = result["kinds"].get(kind)
        if r is None:
            continue
        ref = r["individual"]["dev"]
        title = "full fine-tuning" if kind == "full" else f"LoRA r={result['config']['r']} (query, value)"
        lines += [f"### {title}", "",
                  "| method | setting (chosen on selection split) | " + " | ".join(cols)
                  + " | norm (chosen) | norm (default) | norm acc (chosen) |",
                  "|---|---|" + "---:|" * (len(cols) + 3)]

        def row(name, setting, dev, n_chosen, n_default, n_acc):
            cells = [f"{dev[t]['score']:.3f}" for t in tasks]
            lines.append(f"| {name} | {setting} | " + " | ".join(cells)
                         + f" | {f(n_chosen)} | {f(n_default)} | {f(n_acc)} |")

        if result.get("majority_baseline"):
            maj = result["majority_baseline"]
            row("majority class (reference)", "-", maj, normalised(maj, ref)["mean"], None, _norm_acc(maj, ref))
        row("individual fine-tuned", "-", ref, 1.0, 1.0, 1.0)
        row("base encoder + own head (lam=0)", "-", r["base"]["dev"], r["base"]["norm_dev"]["mean"],
            r["base"]["norm_dev"]["mean"], _norm_acc(r["base"]["dev"], ref))
        ranked = sorted(((m, e) for m, e in r["methods"].items() if "norm_dev_chosen" in e),
                        key=lambda me: -me[1]["norm_dev_chosen"]["mean"])
        for m, e in ranked:
            row(m, setting_label(e["chosen"]), e["dev_chosen"], e["norm_dev_chosen"]["mean"],
                e.get("norm_dev_default", {}).get("mean"), _norm_acc(e["dev_chosen"], ref))
        left_out = [t for t in tasks if ref[t]["score"] <= 1e-9]
        if left_out:
            lines += ["", f"norm leaves out {', '.join(left_out)}: the individual fine-tune scores "
                          f"{', '.join(f(ref[t]['score']) for t in left_out)} there (no ratio)."]
        failed = [m for m, e in r["methods"].items() if "norm_dev_chosen" not in e]
        if failed:
            lines.append("")
            lines.append("failed: " + "; ".join(f"{m} ({e.get('error') or e['sweep'][0].get('error')})"
                                                for m, e in r["methods"].items() if m in failed))
        lines.append("")
    return "\n".join(lines)


def plot(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    kinds = [k for k in KINDS if k in result["kinds"]]
    methods = sorted({m for k in kinds for m, e in result["kinds"][k]["methods"].items() if "norm_dev_chosen" in e},
                     key=lambda m: -max(result["kinds"][k]["methods"].get(m, {}).get("norm_dev_chosen", {})
                                        .get("mean", -9) for k in kinds))
    fig, ax = plt.subplots(figsize=(9, 0.42 * len(methods) + 2.6))
    h = 0.38
    colors = {"full": "#3b6ea8", "lora": "#e07b39"}
    labels = {"full": "full fine-tuning", "lora": "LoRA r=8"}
    for j, k in enumerate(kinds):
        ms = result["kinds"][k]["methods"]
        y = [i + (j - 0.5) * h for i in range(len(methods))]
        chosen = [ms.get(m, {}).get("norm_dev_chosen", {}).get("mean", float("nan")) for m in methods]
        default = [ms.get(m, {}).get("norm_dev_default", {}).get("mean", float("nan")) for m in methods]
        ax.barh(y, chosen, height=h, color=colors[k], label=f"{labels[k]}: tuned on selection split")
        for yy, v in zip(y, chosen):
            if v == v:
                ax.text(max(v, 0) + 0.005, yy, f"{v:.2f}", va="center", fontsize=7)
        ax.scatter(default, y, marker="|", s=120, color="black", zorder=3,
                   label="default setting" if j == 0 else None)
        base = result["kinds"][k]["base"]["norm_dev"]["mean"]
        ax.axvline(base, color=colors[k], ls=":", lw=1.2, label=f"{labels[k]}: base encoder + own heads")
    ax.axvline(1.0, color="grey", lw=1)
    ax.set_yticks(range(len(methods)), methods)
    ax.invert_yaxis()
    ax.set_xlabel("normalised dev score (merged / individual fine-tuned, mean over "
                  + ", ".join(result["config"]["tasks"]) + ")")
    lo = min(0.0, min(float(v) for k in kinds for v in _all_norms(result["kinds"][k])) - 0.05)
    ax.set_xlim(lo, 1.12)
    ax.set_title("deltakit merge quality: MiniLM, 4 GLUE tasks merged into one encoder")
    ax.grid(axis="x", alpha=0.3)
    ax.legend(loc="upper center", bbox_to_anchor=(0.5, -0.07 - 0.6 / len(methods)), ncol=2, fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=130)
    plt.close(fig)


def _all_norms(r: dict):
    yield r["base"]["norm_dev"]["mean"]
    for e in r["methods"].values():
        for key in ("norm_dev_chosen", "norm_dev_default"):
            v = e.get(key, {}).get("mean")
            if v is not None:
                yield v


# what must be equal for a partial rerun's methods to sit in the same table as the rest
_SAME = ("tasks", "data_dir", "model", "n_fit", "n_select", "n_dev", "steps", "batch_size", "max_length", "lr_full",
         "lr_lora", "r", "alpha", "warmup_frac", "weight_decay", "bf16", "seed", "fisher_rows", "gram_rows")


def refresh_previous(new: dict, path: Path, only: set[str], log: Log) -> dict:
    """Put the rerun methods (``--methods``) into the previous full result at ``path``.

    The previous run must have the same fine-tunes and splits; its reference rows must come
    out equal in this run (they are deterministic given the cached fine-tunes), so the
    refreshed methods are comparable with the ones left as they were.
    """
    if not path.is_file():
        raise SystemExit(f"--methods: expected a previous {path} to refresh, found none (run without --methods)")
    prev = json.loads(path.read_text())
    diff = [k for k in _SAME if json.dumps(prev["config"].get(k)) != json.dumps(new["config"].get(k))]
    if diff:
        raise SystemExit(f"--methods: expected the previous run's {diff[0]} ({prev['config'].get(diff[0])}), "
                         f"found {new['config'].get(diff[0])}; rerun everything instead")
    for kind, r in new["kinds"].items():
        old = prev["kinds"].get(kind)
        if old is None:
            raise SystemExit(f"--methods: expected kind {kind} in {path}, found {sorted(prev['kinds'])}")
        if json.dumps(old["individual"], sort_keys=True) != json.dumps(r["individual"], sort_keys=True):
            raise SystemExit(f"--methods: the {kind} fine-tunes score differently from {path}; rerun everything")
        for m in sorted(only | {"task_arithmetic"}):
            if m in r["methods"]:
                old["methods"][m] = r["methods"][m]
    prev["config"] = new["config"]  # identical where it matters (above); the refreshed methods' knobs
    prev.setdefault("refreshed", []).append({"methods": sorted(only), "at": time.strftime("%Y-%m-%d %H:%M"),
                                             "seconds": new["timings"]["total_s"], "machine": new["machine"]})
    log(f"refreshed {sorted(only)} in {path}")
    return prev


def write_report(result: dict, out_dir: Path, write_json_file: bool = True) -> None:
    """merge_quality.json (optional), .md (header + tables + summary) and .png; tables to stdout."""
    cfg = result["config"]
    out_dir.mkdir(parents=True, exist_ok=True)
    if write_json_file:
        write_json(out_dir / "merge_quality.json", result)
    md, summary = table(result), _summary(result)
    m = result["machine"]
    header = (f"# Merge quality: MiniLM on {', '.join(cfg['tasks'])} (dev scores)\n\n"
              f"Generated by `bench/bench_merge_quality.py{' --quick' if result['quick'] else ''}` in "
              f"{result['timings']['total_s'] / 60:.1f} min on {m['cpu']} ({m['cpus']} CPUs, {m['threads']} torch "
              f"thread(s), load {m['load_start'][0]} at start, {m['load_end'][0]} at the end). "
              f"{cfg['steps']} steps x batch {cfg['batch_size']} per task (full FT lr {cfg['lr_full']}, LoRA lr "
              f"{cfg['lr_lora']}), {cfg['n_fit']} training rows per task, {cfg['n_select']} more held out for "
              f"selection; dev <= {cfg['n_dev']} rows per task.\n\n"
              "Metrics: " + ", ".join(f"{t} {TASK_METRIC.get(t, 'accuracy')}" for t in cfg["tasks"])
              + ". **norm** = mean over tasks of merged / individual fine-tuned score (tasks where the individual "
              "score is <= 0 are left out); **norm acc** = the same ratio on accuracy over all tasks. Settings "
              "chosen on the held-out part of TRAIN (never on dev); 'norm (default)' is the method at its "
              "default setting. Every task keeps its own fine-tuned head; base = pre-trained encoder + those "
              "heads.\n\n")
    for r in result.get("refreshed", []):
        header += (f"Rerun later with `--methods {','.join(r['methods'])}` on the same cached fine-tunes "
                   f"({r['at']}, {r['seconds'] / 60:.1f} min): those rows (and task arithmetic, rerun with them).\n\n")
    write_text(out_dir / "merge_quality.md", header + md + "\n" + summary + "\n")
    plot(result, out_dir / "merge_quality.png")
    print("\n" + md)
    print(summary)


def _summary(result: dict) -> str:
    lines = []
    for kind in KINDS:
        r = result["kinds"].get(kind)
        if not r:
            continue
        ms = {m: e for m, e in r["methods"].items() if "norm_dev_chosen" in e}
        ta = ms.get("task_arithmetic", {}).get("norm_dev_chosen", {}).get("mean")
        if ta is None:
            continue
        worse = sorted((m for m, e in ms.items() if m != "task_arithmetic" and e["norm_dev_chosen"]["mean"] < ta),
                       key=lambda m: ms[m]["norm_dev_chosen"]["mean"])
        tr = r["train"]
        lines.append(f"- {kind}: tuned task arithmetic {ta:.3f} ({setting_label(ms['task_arithmetic']['chosen'])}); "
                     f"below it (tuned): {', '.join(worse) or 'none'}. Fine-tune {sum(v['train_s'] for v in tr.values()):.0f}s "
                     f"(losses first->last: " + ", ".join(f"{t} {v['loss_first']}->{v['loss_last']}"
                                                         for t, v in tr.items()) + ").")
        skipped = {m: e["skipped_for_time"] for m, e in r["methods"].items() if e.get("skipped_for_time")}
        if skipped:
            lines.append(f"  - sweep points skipped for the time budget: {skipped}")
    lines.append("- not run: " + "; ".join(f"{m}: {why}" for m, why in result["not_run"].items()))
    return "\n".join(lines)
