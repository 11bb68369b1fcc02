"""RESTA (https://arxiv.org/abs/2402.11746): hand-worked numbers, the DARE pre-step, recipe / CLI."""
from __future__ import annotations

import argparse
import json

import pytest
import torch
import yaml
from safetensors.torch import save_file

from deltakit.merge import MergeConfigError, MergeContext, get_merge, list_merges
from deltakit.merge.methods.resta import RestaConfig
from deltakit.taskvec import LazyCheckpoint

T = torch.tensor


def test_resta_without_drop_on_paper():
    # K=2 [sft, unsafe], safety vector = theta_0 - theta_unsafe = -tau_unsafe:
    #   base + tau_sft - gamma * tau_unsafe, gamma = 0.5
    #   [1, 1, 1, 1] + [2, -4, 6, 8] - 0.5 * [1, 1, -1, 0] = [2.5, -3.5, 7.5, 9]
    m = get_merge("resta")
    x, base = T([[2., -4, 6, 8], [1, 1, -1, 0]]), T([1., 1, 1, 1])
    assert torch.equal(m(x, base, RestaConfig(gamma=0.5, density=1.0)), T([2.5, -3.5, 7.5, 9]))
    # K=3 [sft, safe, unsafe], gamma = 1: base + sft + (safe - unsafe)
    #   [1, 1, 1, 1] + [2, -4, 6, 8] + ([1, 0, 0, 0] - [0, 0, 2, 0]) = [4, -3, 5, 9]
    x3 = T([[2., -4, 6, 8], [1, 0, 0, 0], [0, 0, 2, 0]])
    assert torch.equal(m(x3, base, RestaConfig(gamma=1.0, density=1.0)), T([4., -3, 5, 9]))
    # gamma = 0 is the fine-tune itself
    assert torch.equal(m(x, base, RestaConfig(gamma=0.0, density=1.0)), base + x[0])


def test_dare_drops_only_the_finetune_delta():
    m = get_merge("resta")
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 6, 5, generator=g)
    base = torch.randn(6, 5, generator=g)
    cfg = RestaConfig(gamma=0.8, density=0.6)
    out = m(x, base, cfg, MergeContext(generator=torch.Generator().manual_seed(7)))
    keep = torch.rand(30, generator=torch.Generator().manual_seed(7)) < 0.6  # the same draws, in order
    want = base + (x[0].reshape(-1) * keep / 0.6).reshape(6, 5) - 0.8 * x[1]
    assert torch.allclose(out, want, atol=1e-6)
    # dropped entries carry the safety vector alone, kept ones the fine-tune rescaled by 1/0.6
    dropped = ~keep.reshape(6, 5)
    assert torch.allclose(out[dropped], (base - 0.8 * x[1])[dropped], atol=1e-6)
    assert 0 < int(dropped.sum()) < 30
    # the drop is unbiased: the mean over many draws approaches the undropped result
    outs = torch.stack([m(x, base, cfg, MergeContext(generator=torch.Generator().manual_seed(s)))
                        for s in range(2000)])
    undropped = m(x, base, RestaConfig(gamma=0.8, density=1.0))
    assert (outs.mean(0) - undropped).abs().max() < 0.15 * x[0].abs().max()


def test_resta_rejects_wrong_model_counts_and_ranges():
    m = get_merge("resta")
    with pytest.raises(MergeConfigError, match=r"resta: expected 2 models \[sft, unsafe\] or 3 .* found 1"):
        m(T([[1., 2]]), T([0., 0]), RestaConfig())
    with pytest.raises(ValueError, match="density"):
        RestaConfig(density=0.0)
    with pytest.raises(ValueError, match="gamma"):
        RestaConfig(gamma=-1.0)
    assert "resta" in list_merges()


def _write(d, sd):
    d.mkdir()
    save_file(sd, str(d / "model.safetensors"))
    (d / "config.json").write_text(json.dumps({"num_hidden_layers": 1}))
    return d


def test_resta_from_the_cli_recipe(tmp_path):
    from deltakit.cli import merge as cli_merge

    g = torch.Generator().manual_seed(1)
    base = {"model.layers.0.w": torch.randn(4, 3, generator=g)}
    sft = {"model.layers.0.w": base["model.layers.0.w"] + torch.randn(4, 3, generator=g)}
    unsafe = {"model.layers.0.w": base["model.layers.0.w"] + torch.randn(4, 3, generator=g)}
    for name, sd in (("base", base), ("sft", sft), ("unsafe", unsafe)):
        _write(tmp_path / name, sd)
    p = argparse.ArgumentParser()
    cli_merge.add_parser(p.add_subparsers(dest="command"))
    for density, out in ((1.0, "out1"), (0.5, "out2")):
        (tmp_path / "r.yaml").write_text(yaml.safe_dump({
            "method": "resta", "base_model": "base", "models": ["sft", "unsafe"], "seed": 3,
            "parameters": {"gamma": 0.5, "density": density}}))
        args = p.parse_args(["merge", str(tmp_path / "r.yaml"), "-o", str(tmp_path / out), "--no-progress"])
        assert args.func(args) == 0
    n = "model.layers.0.w"
    b, s, u = base[n], sft[n], unsafe[n]
    assert torch.allclose(LazyCheckpoint(tmp_path / "out1").get(n), s + 0.5 * (b - u), atol=1e-6)
    got = LazyCheckpoint(tmp_path / "out2").get(n)
    # with the drop: every entry is either base + 2 * tau_sft + 0.5 (b - u) (kept) or base + 0.5 (b - u)
    kept = torch.isclose(got, b + 2 * (s - b) + 0.5 * (b - u), atol=1e-5)
    dropped = torch.isclose(got, b + 0.5 * (b - u), atol=1e-5)
    assert bool((kept | dropped).all()) and 0 < int(kept.sum()) < 12


def test_task_vector_merge_takes_the_linear_form_without_drop(monkeypatch):
    """Without the drop RESTA is linear: merge_task_vectors sums it through the executor's fast path,
    equal to the method; with the drop it stacks and runs the method (seeded per tensor)."""
    from deltakit.merge import _job, merge_task_vectors
    from deltakit.taskvec import TaskVector

    calls = []
    real = _job.linear_sum
    monkeypatch.setattr(_job, "linear_sum", lambda *a, **k: calls.append(1) or real(*a, **k))
    g = torch.Generator().manual_seed(4)
    tvs = [TaskVector.from_mapping({"a": torch.randn(3, 2, generator=g), "b": torch.randn(5, generator=g)})
           for _ in range(3)]
    m = get_merge("resta")
    for cfg, fast in ((RestaConfig(gamma=0.7, density=1.0), 4), (RestaConfig(gamma=0.7, density=0.5), 0)):
        calls.clear()
        merged = merge_task_vectors("resta", tvs, cfg, seed=11)
        again = merge_task_vectors("resta", tvs, cfg, seed=11)
        for n in ("a", "b"):
            x = torch.stack([tv.dense(n) for tv in tvs])
            got = merged.get(n)
            assert torch.equal(got, again.get(n))  # the same seed, the same drop
            if fast:
                torch.testing.assert_close(got, x[0] + 0.7 * (x[1] - x[2]), rtol=0, atol=1e-6)
        assert len(calls) == fast  # 2 merges x 2 names, all through linear_sum, or none
