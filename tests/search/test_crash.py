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
TRIALS = 6


def _setup(tmp_path: Path) -> tuple[list[str], str]:
    space = tmp_path / "toy.yaml"
    space.write_text(yaml.safe_dump({"name": "crash", "task": {"toy": True, "toy_seconds": 1.5},
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
    retries = [t.system_attrs.get("failed_trial") for t in ts if t.system_attrs.get("failed_trial") is not None]
    assert sorted(retries) == sorted(t.number for t in failed)  # each failed trial retried exactly once
    by_number = {t.number: t for t in ts}
    for t in ts:
        if t.system_attrs.get("failed_trial") is not None:
            assert t.state.name == "COMPLETE" and t.params == by_number[t.system_attrs["failed_trial"]].params
    # nothing lost, nothing twice: the budget of finished trials, the ones finished before the kill unchanged
    assert TRIALS <= len(done) <= TRIALS + 1
    assert {t.number: tuple(t.values) for t in done if t.number in before} == before
    assert not [t for t in ts if t.state.name in ("RUNNING", "WAITING")]


@pytest.mark.slow
def test_kill_9_of_the_search_then_the_same_command_continues(tmp_path):
    cmd, url = _setup(tmp_path)
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        ts = _wait(lambda ts: sum(t.state.name == "COMPLETE" for t in ts) >= 1
                   and any(t.state.name == "RUNNING" for t in ts), url)
        os.kill(proc.pid, signal.SIGKILL)  # its workers die with it (PR_SET_PDEATHSIG)
        proc.wait(10)
    finally:
        if proc.poll() is None:
            proc.kill()
    time.sleep(0.5)
    ts = _trials(url)
    before = {t.number: tuple(t.values) for t in ts if t.state.name == "COMPLETE"}
    assert any(t.state.name == "RUNNING" for t in ts)  # left behind by the dead workers
    again = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert again.returncode == 0, again.stderr
    _check_finished(url, before)


@pytest.mark.slow
def test_kill_9_of_one_worker_then_the_same_command_again(tmp_path):
    cmd, url = _setup(tmp_path)
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        _wait(lambda ts: any(t.state.name == "RUNNING" for t in ts), url)
        workers = _children(proc.pid)
        assert workers, "the search runs its trials in worker processes"
        # a worker that has a trial running: kill one, and only one
        os.kill(max(workers), signal.SIGKILL)
        _, err = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
    ts = _trials(url)
    before = {t.number: tuple(t.values) for t in ts if t.state.name == "COMPLETE"}
    # the other worker finished the study (it failed the dead worker's stale trial and ran its retry);
    # the search still reports the lost worker with a one-line error and a non-zero exit
    assert proc.returncode == 1 and "exited with code -9" in err.strip().splitlines()[-1], err
    again = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert again.returncode == 0, again.stderr
    _check_finished(url, before)
