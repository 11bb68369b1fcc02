"""``deltakit search SPACE.yaml --backend ray``: the same search, its workers run as Ray Tune trials.

The study stays in Optuna storage, exactly as with the default backend, so resuming, the
no-trial-lost guarantees (heartbeats, retry of stale trials), ``--report`` and the numbers are
identical; Ray Tune is only the executor. Each Tune trial is one search worker
(:func:`~deltakit.search.driver.run_worker`): it pulls trials from the shared study until the
budget is met. ``--workers N`` is N concurrent Tune trials (a grid over the worker index, so
each worker seeds its sampler differently), each asking Ray for ``cpus_per_worker`` CPUs;
Tune places them on the cluster's nodes and restarts a worker that dies (``FailureConfig``),
which then carries on with the same study. Why not Tune's own ``OptunaSearch``: it keeps the
study in the driver's memory, so a crash of the driver loses it and the Optuna-storage resume,
the heartbeat retry and the report would all need a second implementation.

On a Ray cluster
----------------
The workers must reach the storage: use an RDB server every node can connect to (SQLite and
journal files work only when every node sees the same file, e.g. on NFS, and SQLite locking on
NFS is unreliable), and make the task's data paths readable on every node::

    ray start --head --port 6379                     # the head node
    ray start --address HEAD_IP:6379                 # each other node
    deltakit search space.yaml --backend ray --ray-address auto --workers 8 \\
        --storage postgresql://user:pass@db-host/deltakit

``--ray-address auto`` joins the cluster this machine belongs to (or ``HEAD_IP:6379``); without it
a local Ray is started for the run. Running the same command again continues the study; a
worker's trial killed with its node goes stale after ``3 x --heartbeat`` seconds and is retried.
"""
from __future__ import annotations

import tempfile
import threading
from collections.abc import Callable
from typing import Any

from .driver import counts, open_storage, open_study
from .spec import SearchSpec

__all__ = ["run_search_ray"]


def _tune_worker(config: dict) -> None:
    """One search worker as a Tune function trainable; reports how many trials it finished."""
    import os

    import torch
    from ray import tune

    from .driver import run_worker
    from .spec import parse_spec

    torch.set_num_threads(config["threads"])
    os.environ["TOKENIZERS_PARALLELISM"] = "false"
    spec = parse_spec(config["raw"], default_name=config["name"])
    n = run_worker(spec, config["storage"], heartbeat=config["heartbeat"], grace=config["grace"],
                   worker=config["worker"])
    tune.report({"finished": n})


def run_search_ray(spec: SearchSpec, storage_url: str, *, workers: int = 1, heartbeat: int = 10,
                   grace: int | None = None, address: str | None = None, cpus_per_worker: int = 1,
                   tune_dir: str | None = None, progress: Callable | None = None, poll: float = 1.0) -> Any:
    """Run (or continue) the study with ``workers`` concurrent Ray Tune trials; returns the study.
    Joins the Ray at ``address`` (``auto``, ``HOST:PORT``) or starts a local one unless Ray is
    already initialised. ``tune_dir``: where Tune keeps its own experiment records (default: a
    temporary directory removed afterwards; the study in Optuna storage is the record)."""
    if workers < 1:
        raise ValueError(f"--workers: expected an integer >= 1, found {workers}")
    study = open_study(spec, open_storage(storage_url, heartbeat, grace))  # created once, before workers race
    c = counts(study)
    if sum(c.get(s, 0) for s in ("COMPLETE", "PRUNED")) >= spec.trials:
        if progress:  # nothing left: no worker would run a trial, so Ray is not started at all
            progress(study)
        return study
    with tempfile.TemporaryDirectory(prefix="deltakit-tune-") as tmp:
        _fit(spec, study, storage_url, workers=workers, heartbeat=heartbeat, grace=grace, address=address,
             cpus_per_worker=cpus_per_worker, tune_dir=tune_dir or tmp, progress=progress, poll=poll)
    if progress:
        progress(study)
    return study


def _fit(spec: SearchSpec, study, storage_url: str, *, workers: int, heartbeat: int, grace: int | None,
         address: str | None, cpus_per_worker: int, tune_dir: str, progress: Callable | None, poll: float) -> None:
    """One Tune run of ``workers`` search workers on the Ray at ``address`` (or an initialised
    one, or a local one started and stopped here); raises when a worker failed for good."""
    import ray

    started = not ray.is_initialized()
    if started:
        if address:
            ray.init(address=address)
        else:  # a local Ray listens on loopback only; a cluster is started with `ray start` and joined
            ray.init(include_dashboard=False, _node_ip_address="127.0.0.1")
    try:
        _tune(spec, study, storage_url, workers, heartbeat, grace, cpus_per_worker, tune_dir, progress, poll)
    finally:
        if started:
            ray.shutdown()


def _tune(spec: SearchSpec, study, storage_url: str, workers: int, heartbeat: int, grace: int | None,
          cpus_per_worker: int, tune_dir: str, progress: Callable | None, poll: float) -> None:
    from ray import tune

    config = {"worker": tune.grid_search(list(range(workers))), "raw": spec.raw, "name": spec.name,
              "storage": storage_url, "heartbeat": heartbeat, "grace": grace, "threads": cpus_per_worker}
    tuner = tune.Tuner(
        tune.with_resources(_tune_worker, {"cpu": cpus_per_worker}), param_space=config,
        tune_config=tune.TuneConfig(max_concurrent_trials=workers),
        run_config=tune.RunConfig(name=f"deltakit-search-{spec.name}", storage_path=tune_dir, verbose=0,
                                  failure_config=tune.FailureConfig(max_failures=2)))
    stop = threading.Event()
    watcher = _watch(study, progress, poll, stop) if progress else None
    try:
        results = tuner.fit()
    finally:
        stop.set()
        if watcher:
            watcher.join()
    if results.errors:
        raise RuntimeError(f"a search worker on Ray failed ({str(results.errors[0]).splitlines()[-1][:200]}); "
                           "re-run the same command to continue the study")


def _watch(study, progress: Callable, poll: float, stop: threading.Event) -> threading.Thread:
    """``progress(study)`` every ``poll`` seconds from a thread: ``Tuner.fit`` holds the main one."""
    def loop() -> None:
        while not stop.wait(poll):
            progress(study)
    t = threading.Thread(target=loop, name="deltakit-search-progress", daemon=True)
    t.start()
    return t
