"""The demo's search step: a handful of cheap trials of ``deltakit search``, ending with the front.

On one of the demo's synthetic tasks (written to ``<out>/search/train.tsv``), a cross-method
space over LoRA, (IA)3, BitFit and Houlsby adapters (each method's knobs from its config's
declared ranges, as ``deltakit search`` reads them) plus the learning rate, with objectives the
accuracy on a held-out quarter of the training rows and the trainable parameters. TPE proposes
the points; MO-ASHA stops the weaker half at the rung (half the steps). The study
is an SQLite file (``<out>/search/search.db``, made afresh by each demo run) and the step
prints the Pareto front table, the same one ``deltakit search --report`` writes.

Eight trials of at most 24 steps of MiniLM at batch 16 x 32 tokens (120 steps in all when six
stop at the rung): meant to take about half a minute on 2 idle cores.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

__all__ = ["SearchDemoConfig", "run_search_demo"]


@dataclass(frozen=True)
class SearchDemoConfig:
    model: str = "minilm"
    out: str = "runs/demo"
    task: str = "sentiment"       # a synthetic task of deltakit.train.synthetic
    n_train: int = 320            # 240 trained on, 80 held out for the metric
    holdout: float = 0.25
    steps: int = 24
    min_steps: int = 12           # the rung: a trial is judged after 12 of its 24 steps
    eta: int = 2                  # the better half at the rung goes on (a wider front than 1/3)
    batch_size: int = 16
    max_length: int = 32
    trials: int = 8
    seed: int = 0


def search_doc(cfg: SearchDemoConfig, train: Path) -> dict:
    """The search YAML the step runs, as a user would write it."""
    return {"name": "demo-search",
            "task": {"model": cfg.model, "train": str(train), "holdout": cfg.holdout, "max_length": cfg.max_length,
                     "batch_size": cfg.batch_size, "metric": "accuracy"},
            "methods": {"lora": {}, "ia3": {}, "bitfit": {}, "houlsby": {}},
            "training": {"lr": [1e-4, 1e-2], "steps": cfg.steps, "warmup": 0.1},
            "objectives": ["metric", "params"], "sampler": "tpe", "trials": cfg.trials,
            "fidelity": {"min_steps": cfg.min_steps, "eta": cfg.eta}, "seed": cfg.seed}


def run_search_demo(cfg: SearchDemoConfig = SearchDemoConfig()) -> dict:
    """Run the small search and print its Pareto table; returns counts, the table and the db path."""
    import time

    from .search.driver import counts, run_search
    from .search.report import front_table
    from .search.spec import parse_spec
    from .train.data import write_tsv
    from .train.synthetic import make_task

    t0 = time.time()
    d = Path(cfg.out) / "search"
    d.mkdir(parents=True, exist_ok=True)
    rows, _ = make_task(cfg.task, n_train=cfg.n_train, n_dev=0, seed=cfg.seed)
    write_tsv(d / "train.tsv", rows)
    db = d / "search.db"
    db.unlink(missing_ok=True)  # a fresh study: the demo shows trials running, not a finished study resumed
    spec = parse_spec(search_doc(cfg, d / "train.tsv"))
    print(f"\nSearch: {cfg.trials} trials over lora / ia3 / bitfit / houlsby and the learning rate on "
          f"{cfg.task} ({cfg.n_train} rows, {cfg.holdout:.0%} held out), {cfg.steps} steps each, MO-ASHA rung at "
          f"{cfg.min_steps}; study in {db}")
    study = run_search(spec, f"sqlite:///{db}", progress=_progress)
    c = counts(study)
    text = front_table(study)
    print(f"Pareto front (held-out accuracy vs trainable parameters, head excluded) of {c.get('COMPLETE', 0)} complete "
          f"and {c.get('PRUNED', 0)} pruned trials, {time.time() - t0:.0f} s:")
    print(text)
    return {"counts": c, "table": text, "storage": str(db)}


def _progress(study) -> None:
    t = study.trials[-1]
    p, r = t.user_attrs.get("point", {}), t.user_attrs.get("result", {})
    what = (f"held-out {r['values']['metric']:.3f}, {int(r['values']['params']):,} params" if "values" in r
            else f"pruned after {r.get('steps_trained', 0)} steps")
    print(f"  trial {t.number}: {p.get('method')} lr={p.get('training', {}).get('lr', 0):.2g} -> {what}", flush=True)
