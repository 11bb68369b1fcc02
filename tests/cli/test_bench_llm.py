"""`deltakit bench llm --quick`: the LLM benchmark end to end on a tiny random Llama.

Slow: it starts one subprocess per training contender for the peak-memory figures (a fresh
heap each), about 25 s on an idle 2-core CPU and minutes on a loaded one.
"""
from __future__ import annotations

import json

import pytest

from deltakit.cli import main

pytest.importorskip("peft")


@pytest.mark.slow
def test_quick_run_writes_every_figure_and_the_traffic_bound(tmp_path, capsys):
    out = tmp_path / "llm.json"
    assert main(["bench", "llm", "--quick", "--out", str(out)]) == 0
    res = json.loads(out.read_text())
    tr, gen = res["train"], res["generation"]
    assert set(tr["median_s"]) == {"deltakit_lora", "peft_lora", "full_ft", "frozen_floor"}  # no compile in quick runs
    assert all(len(v) == res["settings"]["steps"] for v in tr["times_s"].values())
    assert set(res["memory"]) == {"deltakit_lora", "peft_lora", "full_ft"}
    # the tiny Llama by hand: vocab 512 x 64 embedding (tied head) + 2 blocks of
    # q 64x64, k 32x64, v 32x64, o 64x64, gate/up/down 64x128, two norms of 64, + a final norm
    block = 4096 + 2048 + 2048 + 4096 + 3 * 8192 + 2 * 64
    assert res["memory"]["full_ft"]["trainable_params"] == 512 * 64 + 2 * block + 64 == 106816
    # LoRA r=16: r * (in + out) per linear layer
    lora = 2 * 16 * ((64 + 64) * 2 + (64 + 32) * 2 + (64 + 128) * 3)
    assert res["memory"]["deltakit_lora"]["trainable_params"] == res["memory"]["peft_lora"]["trainable_params"] == lora
    assert all(m["peak_delta_mb"] > 0 for m in res["memory"].values())
    b = gen["bound"]
    assert (b["base_bytes"], b["adapters_bytes"]) == (4 * 106816, 8 * 4 * lora)
    assert b["bound"] == pytest.approx(106816 / (106816 + 8 * lora))
    assert set(gen["tokens_per_s"]) == {"base", "unmerged", "merged", "mixed_8"}
    # greedy to max_new_tokens (no EOS): every run produced batch x new tokens
    new, batch = res["settings"]["new_tokens"], res["settings"]["gen_batch"]
    assert all(r["tokens"] == batch * new for rs in gen["runs"].values() for r in rs)
    assert res["mixed_over_bound"]["end_to_end"] == pytest.approx(gen["ratios"]["mixed_8/single tokens/s"] / b["bound"])
    md = out.with_suffix(".md").read_text()
    assert "deltakit/peft train step" in md and "QUICK" in md and "Load average" in md
    assert "mixed_8/single tokens/s over the bound" in capsys.readouterr().out
