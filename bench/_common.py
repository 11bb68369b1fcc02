"""Plumbing every benchmark shares: machine info, load averages, timers, a log, atomic JSON
writing, a tensor cache and peak-memory probes.

Figures from a shared machine mean little without the load they were taken under, so each
benchmark records ``load_avg()`` beside its figures and ``machine_info()`` once per run.
Nothing here re-implements the library: JSON and tensors are written through ``deltakit.io``
(atomic), task vectors are the library's ``TaskVector``.
"""
from __future__ import annotations

import json
import os
import platform
import statistics
import time
from collections.abc import Callable, Mapping
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results"
DEFAULT_DATA = os.environ.get("DELTAKIT_GLUE_DIR", "/work/shared/data/text")
# GLUE-style tasks and the metric each is scored by
TASK_METRIC = {"sst2": "accuracy", "rte": "accuracy", "mrpc": "f1", "cola": "mcc", "qnli": "accuracy",
               "trec": "accuracy", "subj": "accuracy", "ag_news": "accuracy"}

__all__ = ["HERE", "RESULTS", "DEFAULT_DATA", "TASK_METRIC", "load_avg", "cpu_model", "interleaved", "paired_ratio",
           "machine_info", "timer",
           "Log", "write_json", "write_text", "read_json", "TensorCache", "status_kb", "reset_peak_rss"]


def load_avg() -> list[float]:
    """The 1, 5 and 15 minute load averages, rounded: recorded beside every figure."""
    return [round(x, 2) for x in os.getloadavg()]


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor()


def machine_info(*packages: str) -> dict:
    """CPU, cores, memory, Python / torch versions, torch threads, the load now, and the
    version of each named package (e.g. ``"transformers", "peft"``)."""
    from importlib.metadata import PackageNotFoundError, version

    info = {"platform": platform.platform(), "cpu": cpu_model(), "logical_cpus": os.cpu_count(),
            "python": platform.python_version(), "torch": torch.__version__,
            "torch_threads": torch.get_num_threads(), "load_avg": load_avg()}
    try:
        info["memory_gb"] = round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30, 1)
    except (ValueError, OSError):
        pass
    for p in packages:
        try:
            info[p] = version(p)
        except PackageNotFoundError:
            info[p] = None
    return info


def timer(digits: int | None = 2) -> Callable[[], float]:
    """``elapsed = timer(); ...; elapsed()`` -> wall seconds since the call (rounded to ``digits``)."""
    t0 = time.perf_counter()
    return lambda: time.perf_counter() - t0 if digits is None else round(time.perf_counter() - t0, digits)


class Log:
    """Prints ``[elapsed s load L] message`` (and keeps the lines when ``keep``)."""

    def __init__(self, keep: bool = False, load: bool = True, echo: Callable[[str], None] | None = None) -> None:
        self.t0, self.load, self.lines = time.time(), load, ([] if keep else None)
        self.echo = echo or (lambda line: print(line, flush=True))

    def __call__(self, msg: str) -> None:
        stamp = f"{time.time() - self.t0:7.1f}s" + (f" load {os.getloadavg()[0]:5.2f}" if self.load else "")
        line = f"[{stamp}] {msg}"
        if self.lines is not None:
            self.lines.append(line)
        self.echo(line)


def write_json(path: str | os.PathLike, obj) -> None:
    """Atomic (a reader never sees half a file), sorted keys, indented: deltakit's own writer."""
    from deltakit.io.files import write_json as _write

    Path(path).parent.mkdir(parents=True, exist_ok=True)
    _write(path, obj)


def write_text(path: str | os.PathLike, text: str) -> None:
    """Atomic, like :func:`write_json` (reports: a reader never sees half a table)."""
    from deltakit.io.files import atomic_write

    with atomic_write(path, "w") as f:
        f.write(text)


def read_json(path: str | os.PathLike) -> dict:
    return json.loads(Path(path).read_text())


class TensorCache:
    """``key -> (tensors, meta)`` in ``<dir>/<key>.safetensors`` (meta as JSON in the file's
    metadata), written atomically through ``deltakit.io``, read through ``LazyCheckpoint``.
    A rerun with the same key skips the work that made the entry."""

    def __init__(self, root: str | os.PathLike) -> None:
        self.root = Path(root)

    def path(self, key: str) -> Path:
        return self.root / f"{key}.safetensors"

    def __contains__(self, key: str) -> bool:
        return self.path(key).is_file()

    def get(self, key: str) -> tuple[dict[str, torch.Tensor], dict] | None:
        from deltakit.taskvec import LazyCheckpoint

        if key not in self:
            return None
        ck = LazyCheckpoint(self.path(key))
        return {n: ck.get(n) for n in ck.keys()}, json.loads(ck.metadata["meta"])

    def put(self, key: str, tensors: Mapping[str, torch.Tensor], meta: dict) -> None:
        from deltakit.io.files import save_tensors

        self.root.mkdir(parents=True, exist_ok=True)
        save_tensors(self.path(key), tensors, metadata={"meta": json.dumps(meta)})


def status_kb(field: str) -> int:
    """A ``/proc/self/status`` field in KiB (``VmHWM``: peak resident memory, ``VmRSS``: now)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise KeyError(field)


def reset_peak_rss() -> bool:
    """Reset the kernel's resident high-water mark (``VmHWM``) to the current RSS (Linux >= 4.0),
    so a later peak is the measured work's own; False where the kernel does not allow it."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def interleaved(fns: dict[str, Callable[[], tuple[float, float]]], steps: int, warmup: int = 0) -> dict:
    """Run every fn (returning its wall and CPU seconds) once per round: ``warmup`` untimed
    rounds, then ``steps`` timed ones, so load drift hits every contender alike. Per-fn wall /
    CPU lists, the 1-min load per round, and medians."""
    for _ in range(warmup):
        for fn in fns.values():
            fn()
    times: dict[str, list[float]] = {k: [] for k in fns}
    cpu: dict[str, list[float]] = {k: [] for k in fns}
    loads = []
    for _ in range(steps):
        loads.append(os.getloadavg()[0])
        for k, fn in fns.items():
            wall, c = fn()
            times[k].append(wall)
            cpu[k].append(c)
    return {"times_s": times, "cpu_s": cpu, "loadavg_1m": loads,
            "median_s": {k: statistics.median(v) for k, v in times.items()},
            "median_cpu_s": {k: statistics.median(v) for k, v in cpu.items()}}


def paired_ratio(res: dict, a: str, b: str, key: str = "times_s") -> float:
    """Median over rounds of ``a / b`` (an :func:`interleaved` result): robust to load drift."""
    return statistics.median(x / y for x, y in zip(res[key][a], res[key][b]))
