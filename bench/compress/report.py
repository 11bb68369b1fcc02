"""The compression benchmark's report: JSON, a markdown table per part, quality-vs-bytes plot."""
from __future__ import annotations

from collections import defaultdict
from pathlib import Path

from _common import write_json, write_text

__all__ = ["write_report"]


def _encoder_table(res: dict) -> list[str]:
    rows = res["encoder"]["rows"]
    refs = res["encoder"]["reference"]
    lines = ["| task | codec | knobs | target x | x on disk | score | vs uncompressed (pts) | rel. error | "
             "encode GB/s | decode GB/s |", "|---|---|---|---:|---:|---:|---:|---:|---:|---:|"]
    for t, ref in refs.items():
        lines.append(f"| {t} | uncompressed (fp32) | - | 1 | 1 | {ref['score']:.4f} | 0 | 0 | - | - |")
        for r in (r for r in rows if r["task"] == t):
            knobs = ", ".join(f"{k}={v}" for k, v in r["knobs"].items()) if isinstance(r["knobs"], dict) else "per tensor"
            lines.append(f"| {t} | {r['codec']} | {knobs} | {r['target_ratio'] or '-'} | {r['ratio_file']} | "
                         f"{r['score']:.4f} | {r['delta_points']:+.2f} | {r['rel_error']:.3g} | {r['encode_gbps']} | "
                         f"{r['decode_gbps']} |")
    return lines


def _best_at_16(res: dict) -> list[str]:
    """Per codec: the worst task loss among rows at >= 16x on disk (the issue's target)."""
    worst = defaultdict(dict)
    for r in res["encoder"]["rows"]:
        if r["ratio_file"] >= 16:
            w = worst[r["codec"]]
            w[r["task"]] = max(w.get(r["task"], -1e9), r["delta_points"])
    lines = ["| codec | best setting at >= 16x, per task (pts vs uncompressed) | worst task | meets <= 1 pt |",
             "|---|---|---:|---|"]
    for codec, per in sorted(worst.items()):
        w = min(per.values()) if per else None
        ok = len(per) == len(res["encoder"]["reference"]) and w is not None and w >= -1.0
        lines.append(f"| {codec} | {', '.join(f'{t} {v:+.2f}' for t, v in per.items())} | {w:+.2f} | "
                     f"{'yes' if ok else 'no'} |")
    return lines


def _merge_table(res: dict) -> list[str]:
    rows = res.get("merge") or []
    if not rows:
        return []
    tasks = list(rows[0]["scores"])
    lines = ["| inputs | ratio | " + " | ".join(tasks) + " | mean |", "|---|---:|" + "---:|" * (len(tasks) + 1)]
    for r in rows:
        lines.append(f"| {r['codec']} | {r['ratio'] or 1} | " + " | ".join(f"{r['scores'][t]:.4f}" for t in tasks)
                     + f" | {r['mean']:.4f} |")
    return lines


def _panel(ax, rows: list[dict], ref: float, title: str, ref_label: str, colors: dict[str, str]) -> None:
    """Score against MiB on disk, one line per codec (the budget bold), the uncompressed delta dashed."""
    from matplotlib.ticker import FuncFormatter, LogLocator, NullFormatter

    by = defaultdict(list)
    for r in rows:
        by[r["codec"]].append((r["bytes_file"] / 2**20, r["score"]))
    for codec, pts in sorted(by.items()):
        pts.sort()
        ax.plot(*zip(*pts), marker="o", ms=3, label=codec, lw=2.5 if codec == "budget" else 1, color=colors[codec])
    ax.axhline(ref, color="k", ls="--", lw=0.8, label=ref_label)
    ax.set_xscale("log")
    # 1-2-5 labels: a narrow log axis has no decade tick, and matplotlib's minor labels overlap
    ax.xaxis.set_major_locator(LogLocator(subs=(1.0, 2.0, 5.0)))
    ax.xaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
    ax.xaxis.set_minor_formatter(NullFormatter())
    ax.set_title(title, fontsize=9)
    ax.set_xlabel("MiB on disk")


def _llm_panels(res: dict) -> list[tuple[list[dict], float, str, str]]:
    """Part (b)'s panels: the LoRA deltas, then the full fine-tuning deltas, per task."""
    out = []
    for key, ref_key, name in (("llm", "lora", "LoRA"), ("llm_full", "full", "full FT")):
        part = res.get(key) or {}
        for t, info in (part.get("tasks") or {}).items():
            out.append(([r for r in part["rows"] if r["task"] == t], info[ref_key], f"SmolLM2 {name}: {t}",
                        f"uncompressed {name}"))
    return out


def _plot(res: dict, path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    refs = res["encoder"]["reference"]
    top = [([r for r in res["encoder"]["rows"] if r["task"] == t], ref["score"], f"MiniLM full FT: {t}",
            "uncompressed") for t, ref in refs.items()]
    bottom = _llm_panels(res)
    names = sorted({r["codec"] for panel in top + bottom for r in panel[0]})
    colors = {n: plt.get_cmap("tab10")(i % 10) for i, n in enumerate(names)}  # one colour per codec everywhere
    cols = max(len(top), len(bottom))
    nrows = 2 if bottom else 1
    fig, axes = plt.subplots(nrows, cols, figsize=(4.2 * cols, 3.6 * nrows), squeeze=False)
    for i, panels in enumerate((top, bottom)[:nrows]):
        for ax, panel in zip(axes[i], panels):
            _panel(ax, *panel, colors)
        for ax in axes[i][len(panels):]:
            ax.axis("off")
        axes[i][0].set_ylabel("dev score" if i == 0 else "dev accuracy (generation)")
        axes[i][len(panels) - 1].legend(fontsize=6)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _chosen(task: str, m: dict) -> str:
    per_lr = ", ".join(f"{x['lr']}: {x['hold_accuracy']}" for x in m["tried"])
    c = m["chosen"]
    return (f"{task}: lr {c['lr']} (held-out train accuracy per lr {per_lr}; zero-shot {m['hold_zero_shot']}; "
            f"trained in {c['train_s']:.0f} s at load {c['load'][0]})")


def _llm_full_section(full: dict) -> list[str]:
    from .llm_full import llm_full_table, target_summary

    s = full["settings"]
    ft = {t: i["finetune"] for t, i in full["tasks"].items()}
    # the task whose held-out rows searched the learning rate first (JSON reloads sort the tasks)
    chosen = "; ".join(_chosen(t, m) for t, m in sorted(ft.items(), key=lambda kv: -len(kv[1]["tried"])))
    return ["### (b) SmolLM2 full fine-tuning deltas", "",
            f"Added to this run's report later by `bench/bench_compress.py --add-llm-full` in "
            f"{full['seconds'] / 60:.1f} min (parts (a), (c) and the LoRA rows were not rerun; load "
            f"{full['load_start'][0]} at start, {full['load_end'][0]} at the end; each row carries its 1-min load). "
            f"Only the transformer blocks' linear weights (q, k, v, o, gate, up, down: 210 matrices, "
            f"106M parameters) are fine-tuned, everything else frozen, so the delta is exactly the 2-D matrices "
            f"the codecs compress; {s['steps']} steps x {s['batch_size']} rows (one pass over seeded train rows, "
            f"a superset of the LoRA adapters' 128), "
            f"AdamW, linear decay after {s['warmup_steps']} warm-up steps, bf16 autocast, loss on the answer "
            f"tokens; learning rate picked among {list(s['lrs'])} on {s['n_hold']} held-out *train* rows "
            f"(never dev) of the first task, the later tasks trained once at its pick: {chosen}. Ratios are against the dense fp32 dW; scored on the same "
            f"{next(iter(full['tasks'].values()))['n_dev']} dev rows as the LoRA rows.", "",
            *target_summary(full["rows"], list(full["tasks"])), "", *llm_full_table(full), ""]


def write_report(res: dict, out_dir: Path) -> None:
    out_dir.mkdir(parents=True, exist_ok=True)
    write_json(out_dir / "compress.json", res)
    m = res["machine"]
    lines = [f"# Compression: every codec at {', '.join(f'{r:g}x' for r in res['config']['ratios'])}",
             "", f"Generated by `bench/bench_compress.py` in {res['timings'].get('total_s', 0) / 60:.1f} min on "
             f"{m.get('cpu')} ({m.get('logical_cpus')} CPUs, load {m['load_start'][0]:.2f} at start, "
             f"{m.get('load_end', [0])[0]:.2f} at the end; each row carries the 1-min load when it ran). "
             f"memcpy on this machine: {res['memcpy_gbps']} GB/s.", "",
             "## (a) MiniLM full fine-tuning deltas (encoder; every tensor compressed, heads kept)", "",
             *_best_at_16(res), "", *_encoder_table(res), ""]
    if res.get("merge"):
        lines += [f"## (c) Task arithmetic (lam {res['config']['merge_lam']}) of the compressed deltas", "",
                  *_merge_table(res), ""]
    if res.get("llm"):
        from .llm import llm_table
        lines += ["## (b) SmolLM2 deltas", "", *llm_table(res["llm"]), ""]
    if res.get("llm_full"):
        lines += _llm_full_section(res["llm_full"])
    write_text(out_dir / "compress.md", "\n".join(lines))
    _plot(res, out_dir / "compress.png")
