"""The routing benchmark's report: accuracy per task and system, the share of the oracle's gain
each system keeps, the leave-one-task-out rows, routing overhead."""
from __future__ import annotations

__all__ = ["markdown", "summary"]

LABELS = {"base": "base zero-shot", "oracle": "oracle (own adapter)", "uniform": "uniform merge",
          "ties": "TIES merge", "arrow_top1": "Arrow top-1", "arrow_top2": "Arrow top-2", "mbc": "MBC clusters + Arrow",
          "retrieval": "retrieval (AdapterSwap)", "lorahub_5": "LoraHub, 5 shots", "lorahub_20": "LoraHub, 20 shots"}


def label(system: str) -> str:
    if system.startswith("loo_"):
        return "LOO " + LABELS.get(system[4:], system[4:])
    return LABELS.get(system, system)


def _mean(d: dict, tasks) -> float | None:
    vals = [d[t]["accuracy"] for t in tasks if t in d]
    return sum(vals) / len(vals) if len(vals) == len(tasks) else None


def summary(res: dict) -> dict:
    """Per system: mean accuracy and the share of the oracle's mean gain over the base it keeps."""
    tasks, scores = res["config"]["tasks"], res["scores"]
    b, o = _mean(scores.get("base", {}), tasks), _mean(scores.get("oracle", {}), tasks)
    out = {}
    for s, d in scores.items():
        m = _mean(d, tasks)
        gain = (m - b) / (o - b) if None not in (m, b, o) and o != b else None
        out[s] = {"mean": None if m is None else round(m, 4), "oracle_gain_kept": None if gain is None else round(gain, 3)}
    return out


def _table(res: dict) -> list[str]:
    tasks, scores, summ = res["config"]["tasks"], res["scores"], summary(res)
    lines = ["| system | " + " | ".join(tasks) + " | mean | oracle gain kept | s / task | load (1 min) |",
             "|---|" + "---:|" * (len(tasks) + 4)]
    for s, d in scores.items():
        cells = [f"{100 * d[t]['accuracy']:.0f}" if t in d else "-" for t in tasks]
        m, g = summ[s]["mean"], summ[s]["oracle_gain_kept"]
        secs = sorted(d[t].get("seconds", 0) for t in d)
        loads = sorted(d[t].get("load", 0) for t in d)
        lines.append(f"| {label(s)} | " + " | ".join(cells) + f" | {'-' if m is None else f'{100 * m:.1f}'} | "
                     f"{'-' if g is None else f'{100 * g:.0f}%'} | {secs[len(secs) // 2]:.0f} | "
                     f"{loads[0]:.1f}-{loads[-1]:.1f} |")
    return lines


def _overhead(res: dict) -> list[str]:
    ov = res.get("overhead")
    if not ov:
        return []
    lines = ["", "Routing overhead (greedy generation, tokens/s, median of interleaved rounds; "
             f"{ov['prompts']} prompts x {ov['new_tokens']} new tokens, batch {ov['prompts']}; "
             f"load {ov['load']}):", "",
             "| setting | tokens/s | vs one adapter |", "|---|---:|---:|"]
    for k, v in sorted(ov["tokens_per_s"].items(), key=lambda kv: -ov["relative"][kv[0]]):  # the reference first
        lines.append(f"| {k} | {v:.1f} | {ov['relative'][k]:.2f}x |")
    return lines


def markdown(res: dict, notes: list[str] | None = None) -> str:
    c = res["config"]
    head = [f"# Routing among a library of {len(c['tasks'])} SmolLM2 task LoRAs", "",
            f"Dev accuracy (%) on a seeded subsample of {c['n_dev']} dev rows per task, greedy answers of up to "
            f"{c['max_new_tokens']} tokens mapped to labels (as bench/llm_tasks.py scores them). LOO: "
            "leave-one-task-out, the task's own adapter removed from the library. *Oracle gain kept*: "
            "(mean - base mean) / (oracle mean - base mean).", ""]
    runs = [f"{len(r['systems'])} more system(s) from a run started at load {r['load_start'][0]} with "
            f"{r['config']['threads']} thread(s)" for r in res.get("merged_from", [])]
    tail = ["", *(notes or []), "", f"Machine: {res['machine'].get('cpu')}, torch {res['machine'].get('torch')}, "
            f"{c['threads']} thread(s); load (1/5/15 min) at start {res['load_start']}, at end {res.get('load_end')}"
            + (f"; plus {'; '.join(runs)}" if runs else "") + ". *s / task* is the median wall time per task (routers "
            "fitted or built per task included), *load* the 1-min load average range over its tasks (other jobs shared "
            "the machine).", "Made by `python bench/bench_routing.py` (`deltakit bench routing`)."]
    return "\n".join(head + _table(res) + _overhead(res) + tail) + "\n"
