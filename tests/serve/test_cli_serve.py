"""``deltakit serve`` as users run it: one-line errors, and a real process on 127.0.0.1 that
answers the openai client and exits 0 on SIGTERM."""
from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time

import httpx
import openai
import pytest

from deltakit.cli import main
from tests.serve.helpers import save_adapters, tiny_lm


@pytest.mark.parametrize("argv, message", [
    (["serve", "minilm"], "an encoder without a classification head needs at least one --adapter"),
    (["serve", "x", "--adapter", "noequals"], "expects NAME=PATH, found 'noequals'"),
    (["serve", "x", "--adapter", "a=/nonexistent/dir"], "expected an adapter directory, found nothing"),
    (["serve", "x", "--max-batch", "0"], "expected max_batch >= 1, found 0"),
])
def test_bad_arguments_fail_in_one_line(argv, message, capsys):
    assert main(argv) == 1
    err = capsys.readouterr().err.strip()
    assert message in err and len(err.splitlines()) == 1 and err.startswith("deltakit serve: error:")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_a_served_process_answers_and_stops_on_sigterm(tmp_path):
    model, tok = tiny_lm()
    model.save_pretrained(tmp_path / "base")
    tok.save_pretrained(tmp_path / "base")
    paths = save_adapters(model, tmp_path / "adapters", {"a": 2})
    port = _free_port()
    cmd = [sys.executable, "-m", "deltakit.cli", "serve", str(tmp_path / "base"), "--served-name", "tiny",
           "--adapter", f"a={os.path.relpath(paths['a'], tmp_path)}", "--port", str(port), "--api-key", "k", "--threads", "1"]
    # run from tmp_path with the adapter given relative to it, as a user types it
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=tmp_path,
                            env={**os.environ, "TOKENIZERS_PARALLELISM": "false"})
    try:
        _wait_healthy(proc, f"http://127.0.0.1:{port}/health", 240)  # a cold start under load
        client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="k", max_retries=0, timeout=30)
        assert {m.id for m in client.models.list().data} == {"tiny", "a"}
        out = client.chat.completions.create(model="a", messages=[{"role": "user", "content": "w1 w2"}],
                                             max_tokens=5, temperature=0)
        assert out.usage.completion_tokens >= 1
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(30) == 0
        assert "tiny with 1 adapter(s) on http://127.0.0.1:" in proc.stdout.read()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)


def _wait_healthy(proc, url: str, timeout: float) -> None:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if proc.poll() is not None:
            raise AssertionError(f"server exited with {proc.returncode}: {proc.stderr.read()[-2000:]}")
        try:
            if httpx.get(url, timeout=2).status_code == 200:
                return
        except httpx.TransportError:
            pass
        time.sleep(0.2)
    raise AssertionError(f"server not healthy within {timeout} s")
