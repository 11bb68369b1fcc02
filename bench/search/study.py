"""The search itself, bounded by compute instead of a trial count.

``deltakit.search``'s driver stops a study after N finished trials; here trials are pruned by
MO-ASHA at different steps, so a trial count says nothing about compute. Each worker runs the
library's own objective (:func:`deltakit.search.driver.make_objective`: sample, train through
``fit``, MO-ASHA at the rungs, record the point) one trial at a time and starts another only
while the steps x batch already spent, plus a full trial's worth per trial still running, stay
under the budget. The study lives in SQLite (Optuna storage): a killed run resumes where it
stopped, its running trials failed and retried with the same parameters (failed trials count
no compute: their steps are lost, and said so in the report).
"""
from __future__ import annotations

import multiprocessing as mp
import os
import time
from collections.abc import Callable

__all__ = ["spent_examples", "run_bounded"]


def spent_examples(study, batch_size: int) -> dict[str, int]:
    """Compute spent so far: steps trained x batch over complete and pruned trials, and the count
    of each state (FAIL trials' steps are not in ``examples``: a retry redoes them)."""
    out = {"examples": 0, "COMPLETE": 0, "PRUNED": 0, "RUNNING": 0, "WAITING": 0, "FAIL": 0}
    for t in study.get_trials(deepcopy=False):
        out[t.state.name] = out.get(t.state.name, 0) + 1
        if t.state.name in ("COMPLETE", "PRUNED"):
            out["examples"] += int(t.user_attrs.get("result", {}).get("steps_trained", 0)) * batch_size
    return out


def _may_start(study, budget: int, batch_size: int, full_steps: int) -> bool:
    s = spent_examples(study, batch_size)
    return s["examples"] + (s["RUNNING"] + s["WAITING"]) * full_steps * batch_size < budget


def _worker(raw: dict, url: str, budget: int, worker: int, threads: int, max_trials: int) -> None:
    """One worker: the library's objective, one trial at a time, while the budget allows."""
    import torch

    from deltakit.search.driver import make_objective, make_sampler, open_storage, open_study
    from deltakit.search.objectives import prepare
    from deltakit.search.spec import parse_spec

    torch.set_num_threads(threads)
    os.environ["TOKENIZERS_PARALLELISM"] = "false"
    spec = parse_spec(raw, default_name=raw["name"])
    study = open_study(spec, open_storage(url))
    # as run_worker: two workers (or a resumed run) must not propose the same points
    study.sampler = make_sampler(spec.sampler, spec.seed + 7919 * worker + 104729 * len(study.get_trials(deepcopy=False)),
                                 len(spec.objectives))
    prep = prepare(spec.task, spec.seed)
    if "base_params" not in study.user_attrs:
        study.set_user_attr("base_params", sum(p.numel() for p in prep.model.parameters()))
    objective = make_objective(spec, prep)
    steps, batch = int(raw["training"]["steps"]), spec.task.batch_size
    while _may_start(study, budget, batch, steps) and len(study.get_trials(deepcopy=False)) < max_trials:
        study.optimize(objective, n_trials=1, gc_after_trial=False)


def _worker_main(*args) -> None:
    from deltakit.search.driver import _die_with_parent

    _die_with_parent()
    _worker(*args)


def run_bounded(raw: dict, url: str, budget: int, *, workers: int, threads: int,
                progress: Callable[[object], None], poll: float = 5.0):
    """Run (or resume) the study ``raw['name']`` until ``budget`` examples are spent; returns it.
    Trials a killed run left RUNNING are failed first and re-enqueued (no worker is alive then:
    this benchmark is the study's only user)."""
    from deltakit.search.driver import fail_running, open_storage, open_study
    from deltakit.search.spec import parse_spec

    spec = parse_spec(raw, default_name=raw["name"])
    study = open_study(spec, open_storage(url))
    fail_running(study)
    min_steps = raw["fidelity"]["min_steps"]
    max_trials = len(study.get_trials(deepcopy=False)) + 2 * budget // (min_steps * spec.task.batch_size) + 10
    ctx = mp.get_context("spawn")
    procs = [ctx.Process(target=_worker_main, args=(raw, url, budget, i, threads, max_trials)) for i in range(workers)]
    for p in procs:
        p.start()
    while any(p.is_alive() for p in procs):
        progress(study)
        time.sleep(poll)
    progress(study)
    bad = [(i, p.exitcode) for i, p in enumerate(procs) if p.exitcode != 0]
    if bad:
        raise RuntimeError(f"search worker {bad[0][0]} exited with code {bad[0][1]}; run the same command again to "
                           "continue the study")
    return study


class Progress:
    """A line per change: trials by state, compute spent of the budget, the current front."""

    def __init__(self, task: str, budget: int, batch_size: int, log):
        self.task, self.budget, self.batch, self.log, self.last = task, budget, batch_size, log, None

    def __call__(self, study) -> None:
        from deltakit.search.report import complete_trials, pareto_front

        s = spent_examples(study, self.batch)
        key = (s["COMPLETE"], s["PRUNED"], s["FAIL"])
        if key == self.last:
            return
        self.last = key
        front = pareto_front(complete_trials(study), ["metric", "params"])
        text = "; ".join(f"{t.values[0]:.3f}@{int(t.values[1]):,}" for t in front[:6])
        self.log(f"[{self.task}] search: {s['COMPLETE']} complete, {s['PRUNED']} pruned, {s['FAIL']} failed, "
                 f"{s['RUNNING']} running; {s['examples']:,} / {self.budget:,} examples "
                 f"({100 * s['examples'] / self.budget:.0f}%); front {len(front)}: {text}")
