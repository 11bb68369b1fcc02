"""Run a search as an Optuna study: resumable, and shared by any number of worker processes.

The study lives in Optuna storage: an SQLite file by default (``sqlite:///s.db``), any RDB
URL (``postgresql://...``, ``mysql://...``: workers on many machines share one study), or a
JournalStorage file (``journal:PATH``). Every worker loops: fail stale trials, stop once the
study holds ``trials`` finished (complete + pruned) trials, else run one trial.

Crashes. With RDB storage every running trial beats a heartbeat (Optuna's
``heartbeat_interval``); a trial whose worker died (kill -9, a lost machine) goes stale after
``grace`` seconds, is marked FAILED by the next worker that looks, and
``RetryHeartbeatStaleTrialCallback`` enqueues it again with the same parameters, which the
next free worker runs. FAILED trials do not count, so after ``kill -9`` of the search or of a
worker, running the same command again finishes the study with no trial lost and none
counted twice. Optuna keeps heartbeats for RDB storage only: with a JournalStorage file a
dead worker's trial stays RUNNING until ``fail_running`` (the CLI's ``--fail-running``, when
no worker is alive) fails and re-enqueues it.

Budget. A worker starts a trial only while finished + running (+ waiting retries) trials are
fewer than ``trials``; two workers deciding in the same instant can still start one trial
more than needed (Optuna has no atomic "claim a slot"), never fewer.
"""
from __future__ import annotations

import multiprocessing as mp
import os
import socket
import sys
import time
from collections.abc import Callable
from typing import Any

from .spec import SearchSpec, parse_spec

__all__ = ["open_storage", "make_sampler", "open_study", "run_search", "run_worker", "fail_running", "counts",
           "make_objective", "SPEC_ATTR"]

SPEC_ATTR = "deltakit.search.spec"
_DONE = ("COMPLETE", "PRUNED")


def open_storage(url: str, heartbeat: int = 10, grace: int | None = None):
    """An Optuna storage from a URL: RDB (with heartbeats and retry of stale trials) or
    ``journal:PATH`` / a ``.log`` / ``.journal`` file (JournalStorage)."""
    import optuna
    from optuna.storages import RDBStorage, RetryHeartbeatStaleTrialCallback
    from optuna.storages.journal import JournalFileBackend, JournalStorage

    if url.startswith("journal:") or url.endswith((".log", ".journal")):
        path = url.removeprefix("journal:")
        return JournalStorage(JournalFileBackend(path))
    if "://" not in url:
        raise ValueError(f"--storage: expected an RDB URL (sqlite:///s.db, postgresql://...) or journal:PATH, "
                         f"found {url!r}")
    kw: dict[str, Any] = {}
    if url.startswith("sqlite"):
        kw["engine_kwargs"] = {"connect_args": {"timeout": 60}}  # several processes write one file
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    import warnings
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # heartbeats are marked experimental
        storage = RDBStorage(url, heartbeat_interval=heartbeat, grace_period=grace or 3 * heartbeat,
                             heartbeat_stale_trial_callback=RetryHeartbeatStaleTrialCallback(max_retry=3), **kw)
    if url.startswith("sqlite"):
        _immediate_transactions(storage.engine)
    return storage


def _immediate_transactions(engine) -> None:
    """SQLite ignores ``SELECT ... FOR UPDATE``, so two workers failing one stale trial both
    read RUNNING, both write FAIL, and both enqueue a retry (seen: a trial retried twice).
    ``BEGIN IMMEDIATE`` takes the write lock when a transaction starts, so the second reads
    FAIL and Optuna's ``UpdateFinishedTrialError`` stops it (the SQLAlchemy recipe for
    serialisable SQLite transactions)."""
    from sqlalchemy import event

    engine.dispose()  # connections opened before the listeners would keep pysqlite's own BEGIN

    @event.listens_for(engine, "connect")
    def _no_implicit_begin(dbapi_connection, _record) -> None:
        dbapi_connection.isolation_level = None

    @event.listens_for(engine, "begin")
    def _begin_immediate(connection) -> None:
        connection.exec_driver_sql("BEGIN IMMEDIATE")


def make_sampler(name: str, seed: int, n_objectives: int):
    """Optuna's sampler: TPE (multivariate, grouped for conditional spaces, constant liar for
    parallel workers), NSGA-II, GP-based BO, or random. In a cross-method space NSGA-II and GP
    model only the knobs every trial has (the method; training); Optuna draws each method's own
    knobs at random, so with several methods TPE is the one that learns them."""
    import optuna

    s = optuna.samplers
    if name == "tpe":
        import warnings
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # multivariate / group / constant_liar are experimental
            return s.TPESampler(seed=seed, multivariate=True, group=True, constant_liar=True)
    if name == "nsga2":
        return s.NSGAIISampler(seed=seed)
    if name == "gp":
        return s.GPSampler(seed=seed, warn_independent_sampling=False)
    return s.RandomSampler(seed=seed)


def open_study(spec: SearchSpec, storage, *, create: bool = True):
    """The spec's study in ``storage`` (created on first use); a study of the same name made
    with other objectives is refused."""
    import optuna

    from .fidelity import make_pruner

    max_steps = _max_steps(spec)
    pruner = make_pruner(spec.fidelity.kind, spec.fidelity.min_steps, spec.fidelity.eta, max_steps,
                         len(spec.objectives)) if spec.fidelity else optuna.pruners.NopPruner()
    study = optuna.create_study(storage=storage, study_name=spec.name, directions=spec.directions,
                                sampler=make_sampler(spec.sampler, spec.seed, len(spec.objectives)), pruner=pruner,
                                load_if_exists=True)
    saved = study.user_attrs.get(SPEC_ATTR)
    if saved is None:
        study.set_user_attr(SPEC_ATTR, spec.raw)
    elif tuple(stored := saved.get("objectives", ["metric", "params"])) != spec.objectives:
        raise ValueError(f"study {spec.name!r}: expected objectives {list(stored)} as stored, found "
                         f"{list(spec.objectives)}; give the search another name")
    return study


def _max_steps(spec: SearchSpec) -> int:
    # the training knobs do not depend on the model: 2 stands in for its layers, which a
    # per-layer switch (the autopeft preset) needs before any model is loaded
    p = next(p for p in spec.space(num_layers=2).training.params if p.name == "steps")
    if p.kind == "fixed":
        return int(p.value)
    return int(max(p.choices) if p.kind == "categorical" else p.high)


def counts(study) -> dict[str, int]:
    """Trials by state name (COMPLETE, PRUNED, RUNNING, WAITING, FAIL)."""
    out: dict[str, int] = {}
    for t in study.get_trials(deepcopy=False):
        out[t.state.name] = out.get(t.state.name, 0) + 1
    return out


def fail_running(study, older_than: float = 0.0, unstarted_only: bool = False) -> list[int]:
    """Fail RUNNING trials started more than ``older_than`` seconds ago and enqueue their retries.

    All of them (``--fail-running``) only when no worker is alive: a JournalStorage has no
    heartbeats to tell a dead worker from a slow one. ``unstarted_only``: those whose objective
    never began (no ``point`` recorded): Optuna starts a trial's heartbeat after creating it,
    so a worker killed in between leaves a RUNNING trial without a heartbeat, which Optuna's
    stale check never fails."""
    import datetime

    from optuna.exceptions import UpdateFinishedTrialError
    from optuna.storages import RetryHeartbeatStaleTrialCallback
    from optuna.trial import TrialState

    import warnings

    warnings.filterwarnings("ignore", message="RetryHeartbeatStaleTrialCallback is experimental")
    now = datetime.datetime.now()
    failed = []
    for t in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
        if unstarted_only and "point" in t.user_attrs:
            continue
        if t.datetime_start is not None and (now - t.datetime_start).total_seconds() < older_than:
            continue
        try:
            if study._storage.set_trial_state_values(t._trial_id, state=TrialState.FAIL):
                RetryHeartbeatStaleTrialCallback(max_retry=3)(study, study._storage.get_trial(t._trial_id))
                failed.append(t.number)
        except UpdateFinishedTrialError:  # another worker failed it first
            pass
    return failed


def _fail_unstarted(study, older_than: float) -> None:
    from optuna.storages import RDBStorage

    if isinstance(study._storage, RDBStorage) or isinstance(getattr(study._storage, "_backend", None), RDBStorage):
        fail_running(study, older_than, unstarted_only=True)


# ----------------------------------------------------------------------------- one trial
def make_objective(spec: SearchSpec, prep) -> Callable:
    """The Optuna objective: sample a point, train (or the toy), record it on the trial."""
    import optuna

    from ..core.fields import ConfigError
    from ..core.targets import TargetError
    from ..train.loop import TrainingDivergedError
    from .fidelity import make_fidelity
    from .objectives import TrialStopped, toy_values, train_trial

    space = spec.space(num_layers=prep.num_layers if prep else 2)
    judge = make_fidelity(spec.fidelity.min_steps, spec.fidelity.eta, spec.directions) if spec.fidelity else None

    def objective(trial) -> tuple[float, ...]:
        method, settings, training = space.sample(trial)
        # one attribute per write: each is a storage round trip (a commit in SQLite)
        trial.set_user_attr("point", {"method": method, "settings": _jsonable(settings), "training": training,
                                      "worker": f"{socket.gethostname()}:{os.getpid()}"})
        if settings.get("layers") == ():
            return _pruned(trial, "invalid", "every layer switched off")
        try:
            if prep is None:
                vals = toy_values(spec, method, settings, training, judge, trial)
            else:
                vals = train_trial(spec, prep, method, settings, training, judge, trial)
        except TrialStopped as e:
            trial.set_user_attr("result", {"steps_trained": e.step})
            raise optuna.TrialPruned(str(e)) from None
        except (ConfigError, TargetError) as e:
            return _pruned(trial, "invalid", str(e).splitlines()[0])
        except TrainingDivergedError as e:
            return _pruned(trial, "diverged", str(e).splitlines()[0])
        trial.set_user_attr("result", {"steps_trained": int(training["steps"]), "values": vals})
        return tuple(vals[o] for o in spec.objectives)

    return objective


def _pruned(trial, reason: str, why: str):
    import optuna

    trial.set_user_attr("result", {"steps_trained": 0, reason: why})
    raise optuna.TrialPruned(f"{reason}: {why}")


def _jsonable(settings: dict) -> dict:
    return {k: list(v) if isinstance(v, tuple) else v for k, v in settings.items()}


# ----------------------------------------------------------------------------- workers
def run_worker(spec: SearchSpec, storage_url: str, *, heartbeat: int = 10, grace: int | None = None,
               on_trial: Callable | None = None, poll: float = 0.5, worker: int = 0) -> int:
    """Run trials until the study holds ``spec.trials`` finished ones; returns how many this
    worker finished. ``on_trial(study, frozen_trial)`` after each.

    The sampler's seed mixes the spec's seed, the worker's index and the trials already
    stored: two workers (or a restarted one) must not propose the same points."""
    from optuna.storages import fail_stale_trials

    from .objectives import prepare

    storage = open_storage(storage_url, heartbeat, grace)
    study = open_study(spec, storage)
    study.sampler = make_sampler(spec.sampler, spec.seed + 7919 * worker + 104729 * len(study.get_trials(deepcopy=False)),
                                 len(spec.objectives))
    prep = None if spec.task.toy else prepare(spec.task, spec.seed)
    if prep is not None and "base_params" not in study.user_attrs:
        study.set_user_attr("base_params", sum(p.numel() for p in prep.model.parameters()))
    objective = make_objective(spec, prep)
    done_here = 0
    while True:
        import warnings
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            fail_stale_trials(study)
        _fail_unstarted(study, (grace or 3 * heartbeat) + 10)
        c = counts(study)
        done = sum(c.get(s, 0) for s in _DONE)
        if done >= spec.trials:
            return done_here
        if done + c.get("RUNNING", 0) >= spec.trials and not c.get("WAITING"):
            time.sleep(poll)  # the last trials run elsewhere: wait for them (or for them to go stale)
            continue
        callbacks = [lambda s, t: on_trial(s, t)] if on_trial else []
        study.optimize(objective, n_trials=1, callbacks=callbacks, gc_after_trial=False)
        done_here += 1


def _die_with_parent() -> None:
    """Linux: a worker is killed when the search process dies (kill -9 included), so its
    trial goes stale and is retried, instead of an orphan finishing work nobody waits for."""
    if sys.platform.startswith("linux"):
        import ctypes
        import signal
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG


def _worker_main(raw: dict, name: str, storage_url: str, heartbeat: int, grace: int | None, threads: int,
                 worker: int) -> None:
    _die_with_parent()
    import torch
    torch.set_num_threads(threads)
    os.environ["TOKENIZERS_PARALLELISM"] = "false"
    run_worker(parse_spec(raw, default_name=name), storage_url, heartbeat=heartbeat, grace=grace, worker=worker)


def run_search(spec: SearchSpec, storage_url: str, *, workers: int = 1, heartbeat: int = 10,
               grace: int | None = None, progress: Callable | None = None, poll: float = 1.0,
               backend: str = "optuna", ray_address: str | None = None) -> Any:
    """Run (or continue) the study with ``workers`` processes (1: in this process); returns the
    study. ``progress(study)`` is called after every trial (1 worker) or every ``poll`` seconds.
    ``backend="ray"``: the workers run as Ray Tune trials (:mod:`.ray_backend`), same study."""
    if backend == "ray":
        from .ray_backend import run_search_ray
        return run_search_ray(spec, storage_url, workers=workers, heartbeat=heartbeat, grace=grace,
                              address=ray_address, progress=progress, poll=poll)
    if backend != "optuna":
        raise ValueError(f"--backend: expected optuna or ray, found {backend!r}")
    storage = open_storage(storage_url, heartbeat, grace)
    study = open_study(spec, storage)  # created once here, before workers race to create it
    if workers == 1:
        run_worker(spec, storage_url, heartbeat=heartbeat, grace=grace,
                   on_trial=(lambda s, t: progress(s)) if progress else None)
        return study
    ctx = mp.get_context("spawn")
    threads = max(1, (os.cpu_count() or 1) // workers)
    procs = [ctx.Process(target=_worker_main, args=(spec.raw, spec.name, storage_url, heartbeat, grace, threads, i),
                         daemon=False) for i in range(workers)]
    for p in procs:
        p.start()
    while any(p.is_alive() for p in procs):
        if progress:
            progress(study)
        time.sleep(poll)
    bad = [(i, p.exitcode) for i, p in enumerate(procs) if p.exitcode != 0]
    if bad:
        raise RuntimeError(f"search worker {bad[0][0]} exited with code {bad[0][1]}; re-run the same command to "
                           "continue the study")
    if progress:
        progress(study)
    return study
