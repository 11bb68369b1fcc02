"""What a search found, for people: the Pareto front (table and plot), the best configuration
per parameter budget as a ready-to-train file, and a progress line while it runs.

The front is the non-dominated set of the complete trials over the study's objectives
(:func:`deltakit.search.fidelity.nondominated_rank`), pruned trials (low-fidelity runs)
excluded: their numbers come from fewer steps. The plot is metric against trainable
parameters (log x axis): every complete trial faint, the front bold.
"""
from __future__ import annotations

import math
import shlex
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import yaml

from .._fmt import table
from .fidelity import nondominated_rank
from .spec import OBJECTIVES

__all__ = ["complete_trials", "pareto_front", "front_table", "plot_front", "best_per_budget", "train_command",
           "write_best", "Progress", "write_report"]


def complete_trials(study) -> list[Any]:
    from optuna.trial import TrialState

    return [t for t in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,)) if t.values is not None]


def objectives_of(study) -> list[str]:
    from .driver import SPEC_ATTR

    return list(study.user_attrs.get(SPEC_ATTR, {}).get("objectives", ["metric", "params"]))


def pareto_front(trials: Sequence[Any], objectives: Sequence[str]) -> list[Any]:
    """The non-dominated trials, sorted by the second objective (then the first)."""
    if not trials:
        return []
    v = np.array([t.values for t in trials], dtype=float)
    rank = nondominated_rank(v, [OBJECTIVES[o] for o in objectives])
    front = [t for t, r in zip(trials, rank) if r == 0]
    return sorted(front, key=lambda t: (t.values[1] if len(t.values) > 1 else 0, -t.values[0], t.number))


def _point(t) -> dict[str, Any]:
    """What a trial tried: {method, settings (config fields), training}."""
    p = t.user_attrs.get("point", {})
    return {"method": p.get("method"), "settings": p.get("settings", {}), "training": p.get("training", {})}


def _fmt(name: str, v: float) -> str:
    if name == "params" or name == "bytes":
        return f"{int(v):,}"
    return f"{v:.4f}" if name == "metric" else f"{v:.2f}"


def _knobs(t) -> str:
    s, tr = _point(t)["settings"], _point(t)["training"]
    parts = [f"{k}={_value_text(v)}" for k, v in s.items()]
    return " ".join(parts + ([f"lr={tr['lr']:.2g}"] if "lr" in tr else []))


def front_table(study) -> str:
    objectives = objectives_of(study)
    rows = [{"trial": t.number, "method": _point(t)["method"],
             **{o: _fmt(o, v) for o, v in zip(objectives, t.values)}, "knobs": _knobs(t)}
            for t in pareto_front(complete_trials(study), objectives)]
    return table(rows, ["trial", "method", *objectives, "knobs"]) if rows else "no complete trials yet"


def plot_front(study, path: str | Path) -> Path:
    """metric against trainable parameters (log x): every complete trial faint, the front bold."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise ImportError("the plot needs matplotlib (pip install matplotlib); the table and files need nothing") \
            from None
    objectives = objectives_of(study)
    if not {"metric", "params"} <= set(objectives):
        raise ValueError(f"the plot needs objectives metric and params, found {objectives}")
    im, ip = objectives.index("metric"), objectives.index("params")
    trials = complete_trials(study)
    front = pareto_front(trials, objectives)
    fig, ax = plt.subplots(figsize=(6, 4))
    ax.scatter([max(t.values[ip], 1) for t in trials], [t.values[im] for t in trials], alpha=0.25, s=18,
               color="tab:blue", label="every trial")
    fx = [max(t.values[ip], 1) for t in sorted(front, key=lambda t: t.values[ip])]
    fy = [t.values[im] for t in sorted(front, key=lambda t: t.values[ip])]
    ax.plot(fx, fy, "-o", color="tab:red", lw=2.2, ms=6, label="Pareto front", drawstyle="steps-post")
    ax.set_xscale("log")
    ax.set_xlabel("trainable parameters (head excluded)")
    ax.set_ylabel("held-out metric")
    ax.set_title(study.study_name)
    ax.legend(loc="lower right")
    fig.tight_layout()
    out = Path(path)
    fig.savefig(out, dpi=120)
    plt.close(fig)
    return out


# ----------------------------------------------------------------------------- best per budget
def best_per_budget(study, budgets: Sequence[float]) -> dict[float, Any]:
    """budget -> the complete trial with the best metric among those with params <= budget."""
    objectives = objectives_of(study)
    if "metric" not in objectives:
        raise ValueError(f"best per budget needs the metric objective, found {objectives}")
    im = objectives.index("metric")
    ip = objectives.index("params") if "params" in objectives else None
    out = {}
    for b in budgets:
        fits = [t for t in complete_trials(study) if ip is None or t.values[ip] <= b]
        if fits:
            out[b] = max(fits, key=lambda t: (t.values[im], -t.number))
    return out


def _value_text(v: Any) -> str:
    if isinstance(v, (list, tuple)):
        return ",".join(map(str, v))
    if isinstance(v, bool):
        return str(v).lower()
    if isinstance(v, float):
        return f"{v:.6g}"
    return "none" if v is None else str(v)


def train_command(t, task: dict) -> list[str]:
    """The ``deltakit train`` command line that trains trial ``t``'s configuration (on the
    whole training file: the held-out split was only for choosing)."""
    tr = _point(t)["training"]
    cmd = ["deltakit", "train", "--model", str(task.get("model", "minilm")), "--train", str(task.get("train", "TRAIN")),
           "--method", _point(t)["method"]]
    for k, v in _point(t)["settings"].items():
        cmd += ["--set", f"{k}={_value_text(v)}"]
    cmd += ["--lr", f"{tr.get('lr', 5e-4):.6g}", "--steps", str(tr.get("steps", 200))]
    for flag, key in (("--batch-size", "batch_size"), ("--max-length", "max_length"), ("--max-rows", "max_rows"),
                      ("--metric", "metric")):
        if key in task:
            cmd += [flag, str(task[key])]
    return cmd + ["-o", f"runs/search-trial{t.number}"]


def write_best(study, budgets: Sequence[float], out_dir: str | Path) -> list[Path]:
    """One YAML per budget: the configuration (method, config fields, training) and the
    ``deltakit train`` command that trains it. ``deltakit train`` warms up for 10% of the
    steps; a searched warm-up fraction is recorded, and flagged when it differs."""
    from .driver import SPEC_ATTR

    task = study.user_attrs.get(SPEC_ATTR, {}).get("task") or {}
    task = task if isinstance(task, dict) else {}
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    written = []
    for b, t in best_per_budget(study, budgets).items():
        tr = _point(t)["training"]
        doc = {"budget_params": b, "trial": t.number, "method": _point(t)["method"],
               "config": _point(t)["settings"], "training": tr,
               "values": dict(zip(objectives_of(study), t.values)),
               "command": shlex.join(train_command(t, task))}
        if abs(float(tr.get("warmup", 0.1)) - 0.1) > 1e-9:
            doc["note"] = f"deltakit train warms up 10% of the steps; this trial used {tr['warmup']:.3g}"
        p = out / f"best-{_budget_label(b)}.yaml"
        _write_text(p, yaml.safe_dump(doc, sort_keys=False))
        written.append(p)
    return written


def _write_text(path: Path, text: str) -> None:
    from ..io.files import atomic_write

    with atomic_write(path, "w") as f:
        f.write(text)


def _budget_label(b: float) -> str:
    if math.isinf(b):
        return "any"
    return str(int(b)) if float(b).is_integer() else f"{b:g}"


# ----------------------------------------------------------------------------- progress
class Progress:
    """A tqdm bar with the current front on a terminal; otherwise a line per finished trial."""

    def __init__(self, total: int, stream=None):
        from tqdm.auto import tqdm

        self.stream = stream or sys.stderr
        self.tty = getattr(self.stream, "isatty", lambda: False)()
        self.bar = tqdm(total=total, desc="search", disable=not self.tty, file=self.stream)
        self.seen = 0

    def __call__(self, study) -> None:
        from .driver import counts

        c = counts(study)
        done = c.get("COMPLETE", 0) + c.get("PRUNED", 0)
        if done == self.seen:
            return
        objectives = objectives_of(study)
        front = pareto_front(complete_trials(study), objectives)
        summary = "; ".join(" ".join(_fmt(o, v) for o, v in zip(objectives, t.values)) for t in front[:4])
        line = f"{done} finished ({c.get('PRUNED', 0)} pruned, {c.get('FAIL', 0)} failed), front: {summary}"
        if self.tty:
            self.bar.update(done - self.seen)
            self.bar.set_postfix_str(f"front {len(front)}: {summary}")
        else:
            print(f"search: {line}", file=self.stream, flush=True)
        self.seen = done

    def close(self) -> None:
        self.bar.close()


def write_report(study, out_dir: str | Path, budgets: Sequence[float], plot: bool = True) -> dict[str, Any]:
    """Front table (front.md), plot (front.png) and best-per-budget files in ``out_dir``."""

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    text = front_table(study)
    _write_text(out / "front.md", text + "\n")
    files = {"table": out / "front.md", "best": write_best(study, budgets, out)}
    if plot:
        files["plot"] = plot_front(study, out / "front.png")
    return {"text": text, "files": files}
