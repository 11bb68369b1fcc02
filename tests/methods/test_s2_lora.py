"""S2-LoRA (Sparsely Shared LoRA, Liu et al. 2023): counts from the sharing formula, the
update by hand, factors really shared, the L1 term and the learned rank pattern."""
from __future__ import annotations

import pytest
import torch

import deltakit as dk
from deltakit.methods.s2_lora import rank_pattern, regularizer
from tests.conftest import make_input, make_model, run


def cfg(**kw):
    return dk.get_method("s2_lora").config(**kw)


# tiny Llama: q_proj 16 -> 16, v_proj 16 -> 8 (one KV head of 8), 2 layers
@pytest.mark.parametrize("share,expected", [
    ("AB", 4 * (16 + 16) + 4 * (16 + 8) + 4 * 4),              # one A, B per shape + lambda per target
    ("A", 4 * 16 + 2 * (4 * 16 + 4) + 4 * 16 + 2 * (4 * 8 + 4)),   # shared A per shape, own B and lambda
    ("B", 4 * 16 + 2 * (4 * 16 + 4) + 4 * 8 + 2 * (4 * 16 + 4)),    # shared B per shape, own A and lambda
])
def test_counts_follow_the_sharing(share, expected, tmp_path):
    model = make_model("llama")
    ad = dk.attach(model, cfg(r=4, share=share, targets=["q_proj", "v_proj"]))
    assert ad.num_parameters(trainable_only=True) == expected
    dk.save_adapter(ad, tmp_path / "ad")
    from safetensors import safe_open
    with safe_open(str(tmp_path / "ad" / "adapter.safetensors"), "pt") as f:
        assert sum(f.get_tensor(k).numel() for k in f.keys()) == expected


def test_starts_at_the_base_and_update_by_hand():
    model = make_model("llama")
    x = make_input("llama")
    y0 = run(model, x).detach()
    ad = dk.attach(model, cfg(r=2, alpha=4.0, targets=["q_proj"]))
    torch.testing.assert_close(run(model, x), y0, rtol=0, atol=0)          # lambda = 0
    deltas = dict(ad.deltas())
    d0 = deltas["model.layers.0.self_attn.q_proj"]
    d1 = deltas["model.layers.1.self_attn.q_proj"]
    assert d0._shared is d1._shared                                        # one A, B for both layers
    with torch.no_grad():
        d0._shared.lora_A.copy_(torch.tensor([[1.0] + [0.0] * 15, [0.0, 2.0] + [0.0] * 14]))
        d0._shared.lora_B.zero_()
        d0._shared.lora_B[0, 0], d0._shared.lora_B[1, 1] = 3.0, 5.0
        d0.lora_E.copy_(torch.tensor([0.5, 0.0]))                          # layer 0 uses direction 0 only
        d1.lora_E.copy_(torch.tensor([0.0, -1.0]))                         # layer 1 uses direction 1 only
    dw = dict(ad.delta_weights())
    # s = alpha / r = 2:  dW0[0, 0] = 2 * 3 * 0.5 * 1 = 3;  dW1[1, 1] = 2 * 5 * (-1) * 2 = -20
    exp0 = torch.zeros(16, 16)
    exp0[0, 0] = 3.0
    exp1 = torch.zeros(16, 16)
    exp1[1, 1] = -20.0
    torch.testing.assert_close(dw["model.layers.0.self_attn.q_proj.weight"], exp0)
    torch.testing.assert_close(dw["model.layers.1.self_attn.q_proj.weight"], exp1)
    assert rank_pattern(model) == {"model.layers.0.self_attn.q_proj": 1, "model.layers.1.self_attn.q_proj": 1}


def test_l1_term_value_and_gradient():
    model = make_model("llama")
    ad = dk.attach(model, cfg(r=3, l1_weight=0.1, targets=["q_proj", "v_proj"]))
    with torch.no_grad():
        for i, (_, d) in enumerate(ad.deltas()):
            d.lora_E.copy_(torch.tensor([1.0, -2.0, 0.5]) * (i + 1))
    reg = regularizer(model)
    # sum over the 4 targets of (1 + 2 + 0.5) * (i + 1) = 3.5 * 10, times beta
    torch.testing.assert_close(reg, torch.tensor(0.1 * 3.5 * 10))
    reg.backward()
    for i, (_, d) in enumerate(ad.deltas()):
        torch.testing.assert_close(d.lora_E.grad, torch.tensor([0.1, -0.1, 0.1]))
    assert all(d._shared.lora_A.grad is None for _, d in ad.deltas())      # the term reads lambda only


def test_shared_factors_get_gradient_from_every_layer():
    model = make_model("llama")
    x = make_input("llama")
    ad = dk.attach(model, cfg(r=2, targets=["q_proj"]))
    deltas = [d for _, d in ad.deltas()]
    with torch.no_grad():
        deltas[0].lora_E.fill_(1.0)                    # only layer 0 active
    run(model, x).pow(2).mean().backward()
    g_one = deltas[0]._shared.lora_A.grad.clone()
    model.zero_grad(set_to_none=True)
    for p in ad.parameters():
        p.grad = None
    with torch.no_grad():
        deltas[1].lora_E.fill_(1.0)                    # both layers now use the shared A
    run(model, x).pow(2).mean().backward()
    assert not torch.allclose(deltas[0]._shared.lora_A.grad, g_one)
