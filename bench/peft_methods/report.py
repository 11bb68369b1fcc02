"""The methods benchmark's report: markdown table, plot (dev metric vs trainable parameters)."""
from __future__ import annotations

import os
from pathlib import Path

from _common import write_json

from .config import FULL, TASK_METRIC

__all__ = ["table", "plot", "write_report", "rows_by_point"]


def _cell(r: dict | None) -> str:
    if r is None:
        return "-"
    if "error" in r:
        return "error"
    if r.get("diverged"):
        return "diverged"
    return f"{100 * r['metric']:.1f}"


def rows_by_point(result: dict) -> dict[tuple[str, str], dict[str, dict]]:
    by: dict[tuple[str, str], dict[str, dict]] = {}
    for r in result["runs"]:
        by.setdefault((r["method"], r["label"]), {})[r["task"]] = r
    return by


def table(result: dict) -> str:
    tasks = result["config"]["tasks"]
    by = rows_by_point(result)
    full = by.get((FULL, "default"), {})
    head = ("| method | point | LR | trainable | % of base | stored KB | " + " | ".join(
        f"{t} ({TASK_METRIC[t]})" for t in tasks) + " | mean | vs full FT | train s (mean) |")
    lines = [head, "|" + "---|" * 3 + "---:|" * (3 + len(tasks) + 3)]
    order = sorted(by, key=lambda k: (k[0] != FULL, k[0], {"default": 0}.get(k[1], 1), k[1]))
    for m, label in order:
        rs = by[(m, label)]
        any_r = next(iter(rs.values()))
        ok = [rs[t] for t in tasks if t in rs and "error" not in rs[t] and not rs[t].get("diverged")]
        mean = sum(r["metric"] for r in ok) / len(ok) if len(ok) == len(tasks) else None
        both = [t for t in tasks if t in rs and rs[t] in ok and t in full and "error" not in full[t]]
        fsum = sum(full[t]["metric"] for t in both)
        rel = f"{sum(rs[t]['metric'] for t in both) / fsum:.2f}" if both and fsum > 0 else "-"
        tr = any_r.get("trainable")
        base = any_r.get("base_total") or 1
        lines.append(
            f"| {m} | {label} | {any_r['lr']:g} | {tr:,} | {100 * tr / base:.3f} | "
            f"{any_r.get('stored_bytes', 0) / 1024:.0f} | " + " | ".join(_cell(rs.get(t)) for t in tasks)
            + f" | {'-' if mean is None else f'{100 * mean:.1f}'} | {rel} | "
            f"{sum(r.get('train_s', 0) for r in ok) / max(len(ok), 1):.0f} |")
    return "\n".join(lines)


def plot(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    tasks = result["config"]["tasks"]
    by = rows_by_point(result)
    fig, axes = plt.subplots(1, len(tasks) + 1, figsize=(4.2 * (len(tasks) + 1), 4.6), squeeze=False)
    axes = axes[0]
    markers = {"default": "o", "0.1%": "v", "1%": "^"}
    cmap = plt.get_cmap("tab20")
    methods = sorted({m for m, _ in by})
    color = {m: cmap(i % 20) for i, m in enumerate(methods)}
    for ax, t in zip(axes, [*tasks, "mean"]):
        for (m, label), rs in by.items():
            if t == "mean":
                ok = [rs[x] for x in tasks if x in rs and "error" not in rs[x] and not rs[x].get("diverged")]
                if len(ok) != len(tasks):
                    continue
                y = sum(r["metric"] for r in ok) / len(ok)
                r0 = ok[0]
            else:
                r0 = rs.get(t)
                if r0 is None or "error" in r0 or r0.get("diverged"):
                    continue
                y = r0["metric"]
            x = max(r0["trainable"], 1)
            ax.scatter(x, y, color="black" if m == FULL else color[m], marker=markers.get(label, "s"),
                       s=36, zorder=3)
            if label == "default":
                ax.annotate(m, (x, y), fontsize=6, xytext=(2, 2), textcoords="offset points")
        ax.set_xscale("log")
        ax.set_xlabel("trainable parameters (head excluded, log)")
        ax.set_title(f"{t} ({TASK_METRIC.get(t, 'mean of tasks')})")
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("dev metric")
    handles = [plt.Line2D([], [], marker=mk, linestyle="", color="gray", label=lb) for lb, mk in markers.items()]
    axes[-1].legend(handles=handles, loc="lower right", fontsize=8)
    fig.suptitle("deltakit methods on MiniLM: dev metric vs trainable parameters "
                 "(o paper default, v ~0.1%, ^ ~1% of base)", fontsize=10)
    fig.tight_layout()
    tmp = path.with_suffix(".tmp.png")
    fig.savefig(tmp, dpi=130)
    os.replace(tmp, path)
    plt.close(fig)


def write_report(result: dict, out_dir: Path) -> None:
    from deltakit.io.files import atomic_write, write_json

    out_dir.mkdir(parents=True, exist_ok=True)
    write_json(out_dir / "methods.json", result)
    c = result["config"]
    proto = ", ".join(f"{t} {st} steps x {ml} tokens" + (f" over {nf} rows" if nf else "")
                      for t, st, ml, nf in c["task_protocol"] if t in c["tasks"])
    md = [f"# PEFT methods on MiniLM ({', '.join(c['tasks'])})", "",
          f"Batch {c['batch_size']}; per task: {proto}; bf16 autocast. LR per method from {list(c['lrs'])}, "
          f"chosen by a {c['select_steps']}-step probe scored on a held-out part of SST-2 train. Budget points "
          f"on {', '.join(c['budget_tasks'])}. {c['workers']} workers x {c['threads']} thread(s); "
          f"wall {result['wall_s'] / 60:.0f} min this invocation (cached runs not counted).",
          "", table(result), ""]
    if result["unreachable"]:
        md += ["Budgets a method's knob cannot reach within 1.5x: " + ", ".join(
            f"{u['method']} {u['label']} (closest {u.get('trainable')})" for u in result["unreachable"]), ""]
    if result["skipped"]:
        md += [f"Not run (time budget): {len(result['skipped'])} runs: " + ", ".join(
            f"{s['method']}/{s['label']}/{s['task']}" for s in result["skipped"]), ""]
    with atomic_write(out_dir / "methods.md", "w") as f:
        f.write("\n".join(md) + "\n")
    plot(result, out_dir / "methods.png")
    print("\n".join(md))
