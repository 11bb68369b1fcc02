"""MoLA (Gao et al. 2024): the depth allocation, the routing by hand, the layer against the
official per-expert dispatch (re-written from github.com/GCYZSL/MoLA), counts and init."""
from __future__ import annotations

import math

import pytest
import torch

import deltakit as dk
from deltakit.core.registry import ConfigError
from deltakit.methods.mola import _allocate, routing_weights
from tests.conftest import make_input, make_model, run


def cfg(**kw):
    return dk.get_method("mola").config(**kw)


def test_paper_allocation_2468_over_quarters():
    alloc = _allocate((2, 4, 6, 8), list(range(32)))          # LLaMA-2 7B: 32 layers
    assert [alloc[i] for i in range(32)] == [2] * 8 + [4] * 8 + [6] * 8 + [8] * 8
    assert _allocate((8, 6, 4, 2), [0, 1, 2, 3]) == {0: 8, 1: 6, 2: 4, 3: 2}   # per block
    assert _allocate((2, 4), [3, 5, 9]) == {3: 2, 5: 2, 9: 4}  # floor(i G / n): 0, 0, 1
    with pytest.raises(ConfigError, match="at least 4 targeted blocks"):
        _allocate((2, 4, 6, 8), [0, 1])
    with pytest.raises(ConfigError, match="top_k"):
        cfg(experts=(1, 4), top_k=2)


def test_routing_weights_by_hand():
    logits = torch.log(torch.tensor([[1.0, 2.0, 3.0, 4.0], [4.0, 1.0, 1.0, 2.0]]))
    # softmax = [.1, .2, .3, .4] -> top-2 {3: .4, 2: .3} renormalised; [.5, .125, .125, .25] -> {0, 3}
    expected = torch.tensor([[0.0, 0.0, 3 / 7, 4 / 7], [0.5 / 0.75, 0.0, 0.0, 0.25 / 0.75]])
    torch.testing.assert_close(routing_weights(logits, 2), expected)


def test_counts_and_init(tmp_path):
    model = make_model("llama")
    x = make_input("llama")
    y0 = run(model, x).detach()
    r = 2
    ad = dk.attach(model, cfg(r=r, experts=(2, 3), targets=["q_proj", "down_proj"]))
    torch.testing.assert_close(run(model, x), y0, rtol=0, atol=0)          # every B_i = 0
    # q_proj 16 -> 16, down_proj 32 -> 16; block 0 has 2 experts, block 1 has 3
    per = lambda E, i, o: E * (r * (i + o) + i)                            # noqa: E731
    expected = per(2, 16, 16) + per(2, 32, 16) + per(3, 16, 16) + per(3, 32, 16)
    assert ad.num_parameters(trainable_only=True) == expected
    dk.save_adapter(ad, tmp_path / "ad")
    from safetensors import safe_open
    with safe_open(str(tmp_path / "ad" / "adapter.safetensors"), "pt") as f:
        assert sum(f.get_tensor(k).numel() for k in f.keys()) == expected
    for path, d in ad.deltas():
        assert d.n_experts == (2 if ".0." in path else 3)
        bound = 1 / math.sqrt(d.lora_A.shape[-1])                           # kaiming-uniform, a = sqrt(5)
        assert d.lora_A.abs().max() <= bound and d.router.abs().max() <= bound


def _official(x, router, A, B, scale, top_k):
    """The official Linear_MoE forward, minus the frozen base (per-expert dispatch, index_add)."""
    b, t, d = x.shape
    x = x.reshape(-1, d)
    p = torch.softmax(x @ router.t(), dim=1, dtype=torch.float)
    w, sel = torch.topk(p, top_k, dim=-1)
    w = w / w.sum(dim=-1, keepdim=True)
    mask = torch.nn.functional.one_hot(sel, num_classes=router.shape[0]).permute(2, 1, 0)
    out = torch.zeros(b * t, B.shape[1])
    for e in range(router.shape[0]):
        idx, top_x = torch.where(mask[e])
        if top_x.numel():
            y = (x[top_x] @ A[e].t() @ B[e].t()) * scale
            out.index_add_(0, top_x, y * w[top_x, idx, None])
    return out.reshape(b, t, -1)


def test_layer_equals_the_official_dispatch():
    model = make_model("llama")
    ad = dk.attach(model, cfg(r=2, alpha=4.0, experts=(3, 4), top_k=2, targets=["q_proj"]))
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in ad.parameters():
            p.copy_(torch.randn(p.shape, generator=g))
    layer = model.model.layers[1].self_attn.q_proj
    d = layer.deltas["default"]
    x = torch.randn(2, 5, 16, generator=g)
    with torch.no_grad():
        ref = layer.base(x) + _official(x, d.router, d.lora_A, d.lora_B, 4.0 / 2, 2)
        torch.testing.assert_close(layer(x), ref, rtol=1e-5, atol=1e-5)


def test_router_learns_through_the_top_k_weights():
    model = make_model("llama")
    x = make_input("llama")
    ad = dk.attach(model, cfg(r=2, experts=(3, 3), targets=["q_proj"]))
    with torch.no_grad():
        for _, d in ad.deltas():
            d.lora_B.normal_()
    run(model, x).pow(2).mean().backward()
    for _, d in ad.deltas():
        assert d.router.grad is not None and d.router.grad.abs().sum() > 0
