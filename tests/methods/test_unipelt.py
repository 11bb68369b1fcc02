"""UniPELT (Mao et al. 2022): parameter counts from the paper's parts, the official code's
initialisation, the gates and each gated submodule against a hand computation of the
official formulas (its package, adapter-transformers 2.x, is not installable here)."""
from __future__ import annotations

import torch

import deltakit as dk
from deltakit.methods.unipelt import gate_value
from tests.conftest import make_input, make_model, run

D, L, H, HD = 16, 2, 2, 8     # tiny BERT: hidden 16, 2 layers, 2 heads of 8


def cfg(**kw):
    return dk.get_method("unipelt").config(**kw)


def perturb(adapter, seed=0, scale=0.3):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in adapter.parameters():
            p.add_(scale * torch.randn(p.shape, generator=g))


def test_counts_follow_the_papers_parts(tmp_path):
    r, n, rf = 2, 3, 4
    m = D // rf
    model = make_model("bert")
    ad = dk.attach(model, cfg(r=r, prefix_length=n, reduction_factor=rf))
    lora = 2 * (2 * r * D + D + 1)            # A, B on query and value, one Linear(d, 1) gate each
    prefix = 2 * n * D + D + 1                # P_K, P_V and the prefix gate
    adapter = 2 * m * D + m + D + D + 1       # bottleneck with biases and its gate
    assert ad.num_parameters(trainable_only=True) == L * (lora + prefix + adapter)
    assert sorted(ad.targets) == sorted(f"bert.encoder.layer.{i}.{s}" for i in range(L)
                                        for s in ("attention.self", "attention.self.query",
                                                  "attention.self.value", "output.dense"))
    dk.save_adapter(ad, tmp_path / "ad")
    from safetensors import safe_open
    with safe_open(str(tmp_path / "ad" / "adapter.safetensors"), "pt") as f:
        assert sum(f.get_tensor(k).numel() for k in f.keys()) == L * (lora + prefix + adapter)
    # UniPELT (AP): adapter + prefix only
    ap = dk.attach(make_model("bert"), cfg(components=("adapter", "prefix"), prefix_length=n, reduction_factor=rf))
    assert ap.num_parameters() == L * (prefix + adapter)


def test_official_initialisation():
    torch.manual_seed(0)
    model = make_model("llama")
    ad = dk.attach(model, cfg(init_std=0.02))
    gates = [d.gate for _, d in ad.deltas()]
    w = torch.cat([g.weight.flatten() for g in gates])
    assert all(g.bias.abs().max() == 0 for g in gates)
    assert 0.015 < float(w.detach().std()) < 0.025          # N(0, 0.02), BERT's initializer_range
    for _, d in ad.deltas():
        if d.role == "lora":
            assert d.lora_B.abs().max() == 0 and d.lora_A.abs().max() > 0
        if d.role == "adapter":
            assert d.branch.up.weight.abs().max() > 0 and d.branch.up.bias.abs().max() == 0


def test_gate_is_the_mean_over_positions_of_a_sigmoid():
    gate = torch.nn.Linear(2, 1)
    with torch.no_grad():
        gate.weight.copy_(torch.tensor([[1.0, -1.0]]))
        gate.bias.zero_()
    z = torch.tensor([[[1.0, 0.0], [0.0, 1.0]],         # sigmoid(1), sigmoid(-1): mean exactly 0.5
                      [[2.0, 0.0], [0.0, 0.0]]])        # (sigmoid(2) + 0.5) / 2
    g = gate_value(gate, z)
    assert g.shape == (2, 1, 1)
    torch.testing.assert_close(g.flatten(), torch.tensor([0.5, (0.8807970779778823 + 0.5) / 2]))
    torch.testing.assert_close(gate_value(gate, z[:, 0]).flatten(), torch.sigmoid(torch.tensor([1.0, 2.0])))


def _g(gate, z):
    return torch.sigmoid(z @ gate.weight.t() + gate.bias).mean(1, keepdim=True)      # (B, 1, 1)


def test_attention_by_hand_gated_lora_and_prefix():
    """BERT self-attention under UniPELT == the official formulas written out: gated LoRA
    (gate replaces alpha / r) on query and value, prefixes scaled by the prefix gate."""
    model = make_model("bert")
    ad = dk.attach(model, cfg(r=2, prefix_length=3))
    perturb(ad)
    attn = model.bert.encoder.layer[0].attention.self
    pre = attn.deltas["default"]
    qd, vd = attn.base.query.deltas["default"], attn.base.value.deltas["default"]
    h = torch.randn(2, 4, D)
    with torch.no_grad():
        q = attn.base.query.base(h) + _g(qd.gate, h) * (h @ qd.lora_A.t() @ qd.lora_B.t())
        k = attn.base.key(h)
        v = attn.base.value.base(h) + _g(vd.gate, h) * (h @ vd.lora_A.t() @ vd.lora_B.t())
        gp = _g(pre.gate, h).unsqueeze(1)                                      # (B, 1, 1, 1)

        def heads(t):
            return t.view(2, -1, H, HD).transpose(1, 2)                       # (B, H, T, hd)
        K = pre.prefix_key.view(3, H, HD).transpose(0, 1)                     # (H, n, hd)
        V = pre.prefix_value.view(3, H, HD).transpose(0, 1)
        kk = torch.cat([gp * K, heads(k)], 2)
        vv = torch.cat([gp * V, heads(v)], 2)
        w = torch.softmax(heads(q) @ kk.transpose(-1, -2) / HD ** 0.5, -1)
        ref = (w @ vv).transpose(1, 2).reshape(2, 4, D)
        torch.testing.assert_close(attn(h)[0], ref)


def test_adapter_by_hand():
    model = make_model("bert")
    ad = dk.attach(model, cfg(components=("adapter",), reduction_factor=4))
    perturb(ad)
    dense = model.bert.encoder.layer[1].output.dense
    d = dense.deltas["default"]
    x = torch.randn(3, 5, 32)
    with torch.no_grad():
        hf = dense.base(x)
        f = torch.relu(hf @ d.branch.down.weight.t() + d.branch.down.bias) @ d.branch.up.weight.t() + d.branch.up.bias
        torch.testing.assert_close(dense(x), hf + _g(d.gate, hf) * f)


def test_gates_make_rows_independent_of_each_other():
    """Each row's gate reads only that row: a batch equals its rows run one by one."""
    model = make_model("gpt2")
    perturb(dk.attach(model, cfg(r=2, prefix_length=2, reduction_factor=4)))
    x = make_input("gpt2")
    y = run(model, x)
    for i in range(x.shape[0]):
        torch.testing.assert_close(run(model, x[i:i + 1])[0], y[i], rtol=1e-5, atol=1e-5)


def test_target_inside_a_target_is_applied():
    """Regression (core): LoRA on q/v inside an attention module that also carries prefixes.
    The inner DeltaLayer must replace the projection inside the attention's base (what runs),
    not sit unused beside it; ``unified`` at the LoRA + prefix point then equals deltakit's
    own lora and prefix_tuning together, at equal weights."""
    model = make_model("llama")
    x = make_input("llama")
    lora = dk.attach(model, dk.LoraConfig(r=2, alpha=6.0, targets=["q_proj", "v_proj"]), name="lora")
    pt = dk.attach(model, dk.get_method("prefix_tuning").config(num_virtual_tokens=2), name="pt")
    perturb(lora)
    perturb(pt, seed=1)
    dk.set_active(model, ["lora", "pt"])
    y = run(model, x).detach()
    uni = dk.attach(model, dk.get_method("unified").config(
        position="attention", attention_site="qv", modification="lowrank", insertion="parallel",
        composition="scaled", scale=3.0, r=2, prefix_length=2), name="uni")
    deltas = dict(uni.deltas())
    with torch.no_grad():
        for path, d in lora.deltas():
            deltas[path].branch.down.weight.copy_(d.lora_A)
            deltas[path].branch.up.weight.copy_(d.lora_B)
        for path, d in pt.deltas():
            if d.role != "backbone":
                deltas[path].prefix_key.copy_(d.prefix_key)
                deltas[path].prefix_value.copy_(d.prefix_value)
    torch.testing.assert_close(run(model, x), y, rtol=1e-5, atol=1e-5)
    dk.detach(model, "uni")
    dk.detach(model, "lora")
    dk.detach(model, "pt")
    assert not any(".base." in n or n.endswith(".base") for n, _ in model.named_modules())
