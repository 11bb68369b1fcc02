"""``deltakit search``: run / continue a configuration search, or report on one."""
from __future__ import annotations

import argparse
import math
from pathlib import Path

__all__ = ["add_parser", "run"]

_EPILOG = """examples:
  deltakit search space.yaml --storage sqlite:///s.db --workers 2    # run, or continue after a crash
  deltakit search space.yaml --show-space                            # the knobs and their ranges
  deltakit search --report --storage sqlite:///s.db --budgets 0.1%,1% -o report/

The YAML (see deltakit.search.spec): task (model, train, holdout, metric...), methods / drop /
fields / training (the space: each method's knobs come from its config's declarations), preset
(autopeft), objectives (metric, params, bytes, latency), sampler (tpe, nsga2, gp, random),
trials, fidelity {min_steps, eta, kind: halving|hyperband}, seed."""


def add_parser(sub) -> None:
    p = sub.add_parser("search", help="search method / size / layers / learning rate (Optuna; Pareto front)",
                       description="Search PEFT configurations on one task: a cross-method space read from the "
                                   "method configs' declared fields, trained on the training file with part of it "
                                   "held out for the metric (never dev). The study lives in Optuna storage, so "
                                   "re-running the same command after a crash continues it, and workers on "
                                   "several machines can share one RDB storage.",
                       epilog=_EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("space", nargs="?", help="search YAML (what to train on, the space, objectives, budget)")
    p.add_argument("--storage", default=None,
                   help="Optuna storage: sqlite:///FILE.db (default sqlite:///<space stem>.db), any RDB URL, or "
                        "journal:FILE")
    p.add_argument("--workers", type=int, default=1, help="parallel worker processes on this machine (default 1)")
    p.add_argument("--backend", choices=["optuna", "ray"], default="optuna",
                   help="optuna: worker processes on this machine (default); ray: the workers run as Ray Tune "
                        "trials, locally or on a cluster (--ray-address); the same study either way")
    p.add_argument("--ray-address", default=None, metavar="ADDR",
                   help="--backend ray: join this Ray cluster ('auto' or HEAD_IP:6379; default: a local Ray)")
    p.add_argument("--heartbeat", type=int, default=10,
                   help="seconds between a running trial's heartbeats (RDB storage); a trial silent for 3x this is "
                        "failed and retried (default 10)")
    p.add_argument("--fail-running", action="store_true",
                   help="first fail and re-enqueue every RUNNING trial (a journal storage has no heartbeats; use "
                        "only when no worker is alive)")
    p.add_argument("--show-space", action="store_true", help="print the space's knobs and ranges, run nothing")
    p.add_argument("--report", action="store_true",
                   help="report on the study instead of running it: front table, plot, best config per budget")
    p.add_argument("--name", default=None, help="--report: the study's name (default: the YAML's, or the only one)")
    p.add_argument("--budgets", default=None,
                   help="--report: parameter budgets, counts or percentages of the base model "
                        "(default 0.1%%,1%%,100%% when the base is known, else the best overall)")
    p.add_argument("-o", "--out", default=None, help="--report: output directory (default <study name>-report)")
    p.set_defaults(func=run)


def run(args) -> int:
    if args.ray_address is not None and args.backend != "ray":
        raise ValueError(f"--ray-address: expected --backend ray with it, found --backend {args.backend}")
    if args.workers < 1:
        raise ValueError(f"--workers: expected an integer >= 1, found {args.workers}")
    if args.report:
        return _report(args)
    if not args.space:
        raise ValueError("expected a search YAML (deltakit search SPACE.yaml) or --report, found neither")
    from ..search.spec import load_spec

    spec = load_spec(args.space)
    if args.show_space:
        return _show_space(spec)
    return _run(args, spec)


def _storage_url(args) -> str:
    if args.storage:
        return args.storage
    if not args.space:
        raise ValueError("--storage: expected the study's storage URL, found none")
    return f"sqlite:///{Path(args.space).with_suffix('.db')}"


def _show_space(spec) -> int:
    from .._fmt import table

    print(table(spec.space(num_layers=2).describe(), ["knob", "range"]))
    return 0


def _run(args, spec) -> int:
    from ..search.driver import fail_running, open_storage, open_study, run_search
    from ..search.report import Progress, front_table

    url = _storage_url(args)
    if args.fail_running:
        failed = fail_running(open_study(spec, open_storage(url, args.heartbeat)))
        print(f"failed and re-enqueued running trials: {failed or 'none'}")
    where = " on Ray" if args.backend == "ray" else ""
    print(f"search {spec.name!r}: {spec.trials} trials, objectives {', '.join(spec.objectives)}, sampler "
          f"{spec.sampler}, storage {url}, {args.workers} worker(s){where}; re-run the same command to continue")
    bar = Progress(spec.trials)
    try:
        study = run_search(spec, url, workers=args.workers, heartbeat=args.heartbeat, progress=bar,
                           backend=args.backend, ray_address=args.ray_address)
    finally:
        bar.close()
    print(front_table(study))
    return 0


def _report(args) -> int:
    import optuna

    from ..search.report import write_report

    url = _storage_url(args)
    name = args.name
    if name is None and args.space:
        from ..search.spec import load_spec
        name = load_spec(args.space).name
    if name is None:
        names = optuna.get_all_study_names(url)
        if len(names) != 1:
            raise ValueError(f"--name: expected one of the stored studies {names}, found none given")
        name = names[0]
    try:
        study = optuna.load_study(study_name=name, storage=url)
    except KeyError:
        raise ValueError(f"--name: expected a study in {url} ({optuna.get_all_study_names(url)}), found {name!r}") \
            from None
    budgets = _budgets(args.budgets, study.user_attrs.get("base_params"))
    out = Path(args.out or f"{name}-report")
    rep = write_report(study, out, budgets, plot=_can_plot(study))
    print(rep["text"])
    for kind, f in rep["files"].items():
        for p in f if isinstance(f, list) else [f]:
            print(f"wrote {p}" + (f"  ({kind})" if kind != "best" else ""))
    return 0


def _can_plot(study) -> bool:
    from ..search.report import objectives_of

    return {"metric", "params"} <= set(objectives_of(study))


def _budgets(text: str | None, base: int | None) -> list[float]:
    """``"0.1%,1%,50000"`` -> parameter counts (a percentage needs the base's size)."""
    if text is None:
        return [base * f for f in (0.001, 0.01, 1.0)] if base else [math.inf]
    out = []
    for item in text.split(","):
        item = item.strip()
        try:
            if item.endswith("%"):
                if not base:
                    raise ValueError(f"--budgets: expected parameter counts (the study has no base model size), "
                                     f"found {item!r}")
                out.append(base * float(item[:-1]) / 100)
            else:
                out.append(float(item))
        except ValueError as e:
            if "--budgets" in str(e):
                raise
            raise ValueError(f"--budgets: expected counts or percentages like 0.1%,50000, found {item!r}") from None
    return out
