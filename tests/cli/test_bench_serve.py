"""`deltakit bench serve`: it loads through the CLI, and its memory-traffic bound and ratios are
the hand-worked numbers (the real run needs SmolLM2 and minutes; see bench/results/serve.md)."""
from __future__ import annotations

from pathlib import Path

import pytest

from deltakit.cli import main

BENCH = Path(__file__).resolve().parents[2] / "bench"


def test_bench_serve_loads_through_the_cli(capsys):
    with pytest.raises(SystemExit) as e:
        main(["bench", "serve", "--help"])
    out = capsys.readouterr().out
    assert e.value.code == 0 and "--http-adapters" in out and "--quick" in out


def _run(contender, n, tps, steps=(), tokens=None):
    return {"contender": contender, "adapters": n, "round": 0, "tokens_per_s": tps, "p50_s": 1.0, "p99_s": 2.0,
            "requests": 4, "errors": 0, "distinct_requested": n, "load_1m": [3.0, 4.0],
            "step_keys": [sorted(s) for s in steps], "out_tokens": tokens or {0: [1, 2, 3], 1: [4, 5, 6]}}


def test_bound_is_base_over_base_plus_the_adapters_read_per_decode_step(monkeypatch):
    monkeypatch.syspath_prepend(str(BENCH))
    from serve.report import summarize

    # base 1000 bytes; a0 100, a1 300, a2 500. Single run: a0 every step -> bound 1000 / 1100.
    # Two-adapter run: steps {a0, a1} and {a1, a2} -> mean extra (400 + 800) / 2 = 600 -> 1000 / 1600.
    res = {"base_bytes": 1000, "adapter_bytes": {"a0~1": 100, "a1~2": 300, "a2~3": 500},
           "runs": [_run("deltakit", 1, 10.0, [{"a0~1"}, {"a0~1"}]),
                    _run("deltakit", 3, 6.0, [{"a0~1", "a1~2"}, {"a1~2", "a2~3"}],
                         tokens={0: [1, 2, 3], 1: [4, 5, 7]}),
                    _run("peft", 3, 4.0), _run("merged", 3, 12.0)]}
    s = summarize(res)
    one, three = s["table"]["deltakit"]["1"], s["table"]["deltakit"]["3"]
    assert one["bound"] == pytest.approx(1000 / 1100) and three["bound"] == pytest.approx(1000 / 1600)
    assert three["mean_distinct_per_step"] == 2 and three["mean_adapter_bytes_per_step"] == 600
    assert three["vs_single"] == 0.6 and three["vs_single_over_bound"] == pytest.approx(0.6 * 1.6, abs=1e-3)
    assert three["bound_vs_single"] == pytest.approx(1100 / 1600, abs=1e-4)
    assert three["vs_merged"] == 0.5 and three["speedup_vs_peft"] == 1.5
    # greedy tokens: request 1 differs at its last token -> 1 of 2 identical, shared prefix (1 + 2/3) / 2
    assert s["agreement"]["deltakit_vs_peft_3"] == {"requests": 2, "identical": 1, "mean_prefix": 0.833}
    assert all("out_tokens" not in r and "step_keys" not in r for r in res["runs"])
