"""kill -9 of the search, or of one worker, then the same command again: the study finishes with
no trial lost and none counted twice; the interrupted trials are FAILED and retried once."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import optuna
import pytest
import yaml

optuna.logging.set_verbosity(optuna.logging.WARNING)
TRIALS = 5


def _setup(tmp_path: Path) -> tuple[list[str], str]:
    space = tmp_path / "toy.yaml"
    space.write_text(yaml.safe_dump({"name": "crash", "task": {"toy": True, "toy_seconds": 3.0},
                                     "methods": {"lora": {}, "houlsby": {}}, "trials": TRIALS, "sampler": "random"}))
    url = f"sqlite:///{tmp_path / 's.db'}"
    cmd = [sys.executable, "-m", "deltakit.cli", "search", str(space), "--storage", url, "--workers", "2",
           "--heartbeat", "1"]
    return cmd, url


def _trials(url: str) -> list:
    try:
        return optuna.load_study(study_name="crash", storage=url).get_trials(deepcopy=False)
    except KeyError:
        return []


def _wait(pred, url: str, timeout: float = 60.0) -> list:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        ts = _trials(url)
        if pred(ts):
            return ts
        time.sleep(0.2)
    raise AssertionError(f"timed out; states {[t.state.name for t in _trials(url)]}")


def _running(t) -> bool:
    """RUNNING with its point drawn (so the trial names its worker)."""
    return t.state.name == "RUNNING" and "point" in t.user_attrs


def _children(pid: int) -> list[int]:
    kids = []
    for d in Path("/proc").iterdir():
        if d.name.isdigit():
            try:
                if int((d / "stat").read_text().rsplit(")", 1)[1].split()[1]) == pid:
                    kids.append(int(d.name))
            except (OSError, IndexError, ValueError):
                pass
    return kids


def _check_finished(url: str, before: dict[int, tuple]) -> None:
    ts = _trials(url)
    done = [t for t in ts if t.state.name == "COMPLETE"]
    failed = [t for t in ts if t.state.name == "FAIL"]
    assert failed, "the interrupted trials are marked FAILED"
    # the trial each retry replaces (a retry that died is retried in turn: retry_history grows)
    retries = [t.system_attrs["retry_history"][-1] for t in ts if t.system_attrs.get("retry_history")]
    assert sorted(retries) == sorted(t.number for t in failed)  # each failed trial retried exactly once
    by_number = {t.number: t for t in ts}
    for t in ts:
        if t.system_attrs.get("retry_history"):
            # the retry keeps what the dead trial had drawn (it may have died before drawing it all)
            lost = by_number[t.system_attrs["retry_history"][-1]].params
            assert t.state.name in ("COMPLETE", "FAIL") and {k: t.params[k] for k in lost} == lost
    # nothing lost, nothing twice: the budget of finished trials, the ones finished before the kill unchanged
    assert TRIALS <= len(done) <= TRIALS + 1
    assert {t.number: tuple(t.values) for t in done if t.number in before} == before
    assert not [t for t in ts if t.state.name in ("RUNNING", "WAITING")]


@pytest.mark.slow
def test_kill_9_of_a_worker_and_of_the_search_then_the_same_command_continues(tmp_path):
    """One run, both crashes (each spawn costs seconds of imports): a worker is killed in the
    middle of a trial, then the search itself (its other worker dies with it, mid-trial too)."""
    cmd, url = _setup(tmp_path)
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        ts = _wait(lambda ts: any(_running(t) for t in ts), url)
        victim = next(t for t in ts if _running(t))
        pid = int(victim.user_attrs["point"]["worker"].rsplit(":", 1)[1])
        assert pid in _children(proc.pid), "the search runs its trials in worker processes"
        os.kill(pid, signal.SIGKILL)  # the worker running that trial, and only it
        _wait(lambda ts: sum(t.state.name == "COMPLETE" for t in ts) >= 1
              and any(_running(t) and t.number != victim.number for t in ts), url)
        os.kill(proc.pid, signal.SIGKILL)  # now the search: its remaining worker dies with it (PDEATHSIG)
        proc.wait(10)
    finally:
        if proc.poll() is None:
            proc.kill()
    time.sleep(0.5)
    ts = _trials(url)
    before = {t.number: tuple(t.values) for t in ts if t.state.name == "COMPLETE"}
    assert any(t.state.name in ("RUNNING", "FAIL") for t in ts)  # left behind by the dead workers
    again = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert again.returncode == 0, again.stderr
    _check_finished(url, before)
    assert len([t for t in _trials(url) if t.state.name == "FAIL"]) >= 2  # both interrupted trials


def test_a_dead_worker_is_reported_with_one_line_and_a_nonzero_exit(tmp_path, monkeypatch):
    from deltakit.search import driver
    from deltakit.search.spec import parse_spec

    class Dead:
        exitcode = -9

        def __init__(self, *a, **k):
            pass

        def start(self):
            pass

        def is_alive(self):
            return False

    class Ctx:
        Process = Dead

    monkeypatch.setattr(driver.mp, "get_context", lambda kind: Ctx())
    spec = parse_spec({"name": "x", "task": "toy", "methods": ["lora"], "trials": 1})
    with pytest.raises(RuntimeError, match=r"^search worker 0 exited with code -9; re-run the same command to "
                                           r"continue the study$"):
        driver.run_search(spec, f"sqlite:///{tmp_path / 's.db'}", workers=2)
