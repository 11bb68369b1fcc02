"""Activation deltas: bottleneck adapters, Compacter, prompt / prefix tuning, DePT, unified.

Per method: (a) trainable and stored parameter counts from the paper's formula,
(b) the paper's initialisation property, (c) hand-checked numbers or an independent
reference computation (the frozen model driven by ``inputs_embeds`` / a pre-filled
KV cache, or deltakit's own LoRA / Houlsby at equal weights).
"""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from safetensors import safe_open
from torch import nn

import deltakit as dk
from deltakit.core.registry import ConfigError
from tests.conftest import make_input, make_model, run

# tiny fixtures (tests/conftest.py): hidden d = 16, L = 2 layers, FFN 32, vocab 64, T = 6
D, L, FFN = 16, 2, 32


def cfg(method: str, **kw):
    return dk.get_method(method).config(**kw)


def stored(adapter, tmp_path) -> int:
    dk.save_adapter(adapter, tmp_path / "ad")
    with safe_open(str(tmp_path / "ad" / "adapter.safetensors"), "pt") as f:
        return sum(f.get_tensor(k).numel() for k in f.keys())


def check_counts(adapter, tmp_path, expected: int) -> None:
    assert adapter.num_parameters(trainable_only=True) == expected
    assert stored(adapter, tmp_path) == expected


def perturb(adapter, seed=0, scale=0.3):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in adapter.parameters():
            p.add_(scale * torch.randn(p.shape, generator=g))


# ---------------------------------------------------------------- bottleneck adapters
def test_houlsby_counts_init_and_numbers(tmp_path):
    model = make_model("bert")
    x = make_input("bert")
    y0 = run(model, x)
    m = 4
    ad = dk.attach(model, cfg("houlsby", bottleneck_size=m))
    # Houlsby: per adapter 2md + m + d, two adapters (attention, FFN) per layer
    check_counts(ad, tmp_path, L * 2 * (2 * m * D + m + D))
    assert sorted(ad.targets) == [f"bert.encoder.layer.{i}.{s}" for i in range(L)
                                  for s in ("attention.output.dense", "output.dense")]
    # near-identity init: weights ~ N(0, 1e-2) truncated at 2 std, biases 0
    for _, d in ad.deltas():
        for lin in (d.branch.down, d.branch.up):
            assert lin.weight.abs().max() <= 2e-2 and lin.bias.abs().max() == 0
    assert (run(model, x) - y0).abs().max() < 1e-3

    # hand-checked: h = W x + b; h' = h + relu(h Wd^T + bd) Wu^T + bu
    lin = nn.Sequential(nn.Linear(2, 2))
    with torch.no_grad():
        lin[0].weight.copy_(torch.tensor([[1.0, 0.0], [0.0, 2.0]]))
        lin[0].bias.zero_()
    a = dk.attach(lin, cfg("houlsby", bottleneck_size=1, targets=["0"]))
    d = next(iter(a.deltas()))[1]
    with torch.no_grad():
        d.branch.down.weight.copy_(torch.tensor([[1.0, -1.0]]))
        d.branch.down.bias.fill_(0.5)
        d.branch.up.weight.copy_(torch.tensor([[2.0], [3.0]]))
        d.branch.up.bias.copy_(torch.tensor([0.0, 1.0]))
    # x = (3, 1): h = (3, 2); relu(3 - 2 + 0.5) = 1.5; h' = (3 + 3, 2 + 4.5 + 1)
    torch.testing.assert_close(lin(torch.tensor([[3.0, 1.0]])), torch.tensor([[6.0, 7.5]]))
    # x = (0, 1): h = (0, 2); relu(-2 + 0.5) = 0; h' = h + bu
    torch.testing.assert_close(lin(torch.tensor([[0.0, 1.0]])), torch.tensor([[0.0, 3.0]]))


def test_pfeiffer_ffn_only(tmp_path):
    model = make_model("gpt2")
    m = 4
    ad = dk.attach(model, cfg("pfeiffer", bottleneck_size=m))
    assert sorted(ad.targets) == [f"transformer.h.{i}.mlp.c_proj" for i in range(L)]
    check_counts(ad, tmp_path, L * (2 * m * D + m + D))


@pytest.mark.parametrize("method,s", [("parallel_adapter", 1.0), ("scaled_parallel", 4.0)])
def test_parallel_adapters(method, s, tmp_path):
    model = make_model("llama")
    x = make_input("llama")
    y0 = run(model, x)
    m = 4
    ad = dk.attach(model, cfg(method, bottleneck_size=m))
    assert sorted(ad.targets) == [f"model.layers.{i}.mlp" for i in range(L)]
    check_counts(ad, tmp_path, L * (2 * m * D + m + D))
    # He et al.'s (LoRA-style) init: W_up = 0, so the model starts exactly at the base
    torch.testing.assert_close(run(model, x), y0, rtol=0, atol=0)

    # hand-checked: out = W x + b + s * (relu(x Wd^T + bd) Wu^T + bu), branch reads x
    lin = nn.Sequential(nn.Linear(2, 2))
    with torch.no_grad():
        lin[0].weight.copy_(torch.eye(2))
        lin[0].bias.zero_()
    a = dk.attach(lin, cfg(method, bottleneck_size=1, targets=["0"]))
    d = next(iter(a.deltas()))[1]
    with torch.no_grad():
        d.branch.down.weight.copy_(torch.tensor([[1.0, 1.0]]))
        d.branch.up.weight.copy_(torch.tensor([[1.0], [-1.0]]))
    # x = (1, 2): branch = relu(3) * (1, -1) = (3, -3)
    torch.testing.assert_close(lin(torch.tensor([[1.0, 2.0]])), torch.tensor([[1 + 3 * s, 2 - 3 * s]]))


def test_parallel_adapter_on_bert_reads_the_ffn_input():
    model = make_model("bert")
    ad = dk.attach(model, cfg("scaled_parallel", bottleneck_size=4))
    perturb(ad)
    layer = model.bert.encoder.layer[0].output          # BertOutput(intermediate, ffn_input)
    inter, ffn_in = torch.randn(2, 3, FFN), torch.randn(2, 3, D)
    with dk.disabled(model):
        base = layer(inter, ffn_in)
    d = layer.deltas["default"]
    torch.testing.assert_close(layer(inter, ffn_in), base + 4.0 * d.branch(ffn_in))


# ---------------------------------------------------------------- Compacter
@pytest.mark.parametrize("method,positions", [("compacter", 2), ("compacter_pp", 1)])
def test_compacter_counts_and_sharing(method, positions, tmp_path):
    model = make_model("bert")
    k, n = 4, 2
    ad = dk.attach(model, cfg(method, bottleneck_size=k, phm_dim=n))
    # paper section 3.4: Compacter 4L(k + d) + n^3, Compacter++ 2L(k + d) + n^3 (no biases);
    # each adapter position adds L(k + d) biases (down: k, up: d)
    paper = 2 * positions * L * (k + D) + n ** 3
    check_counts(ad, tmp_path, paper + positions * L * (k + D))
    # the slow weights A_i are one tensor shared by every PHM layer, stored once
    A = {id(d.branch.down._A) for _, d in ad.deltas()} | {id(d.branch.up._A) for _, d in ad.deltas()}
    assert A == {id(ad.shared.phm_rule)}
    with safe_open(str(tmp_path / "ad" / "adapter.safetensors"), "pt") as f:
        assert [key for key in f.keys() if "phm_rule" in key] == ["deltakit_shared.phm_rule"]


def test_phm_layer_is_a_sum_of_kronecker_products():
    from deltakit.methods._adapter_common import PHMLinear
    torch.manual_seed(0)
    A = torch.randn(2, 2, 2)
    layer = PHMLinear(4, 6, 2, A, rank=1, bias=True)
    B = layer.phm_s @ layer.phm_t                                  # (n, 2, 3), each rank 1
    assert all(torch.linalg.matrix_rank(B[i]) == 1 for i in range(2))
    W = torch.kron(A[0], B[0]) + torch.kron(A[1], B[1])            # (4, 6)
    torch.testing.assert_close(layer.weight(), W)
    x = torch.randn(3, 4)
    with torch.no_grad():
        layer.bias.copy_(torch.arange(6.0))
    torch.testing.assert_close(layer(x), x @ W + torch.arange(6.0))
    # hand-checked: A_0 = [[1, 0], [0, 1]], B_0 = [[1]] -> W = I (n = 2, widths 2 -> 2)
    one = PHMLinear(2, 2, 2, torch.stack([torch.eye(2), torch.zeros(2, 2)]), rank=0, bias=False)
    with torch.no_grad():
        one.phm_B.copy_(torch.tensor([[[1.0]], [[5.0]]]))
    torch.testing.assert_close(one.weight(), torch.eye(2))


def test_compacter_starts_near_identity():
    model = make_model("gpt2")
    x = make_input("gpt2")
    y0 = run(model, x)
    dk.attach(model, cfg("compacter", bottleneck_size=4, phm_dim=2))
    # A_i ~ N(0, 0.01): the adapter output is small against the hidden states
    assert (run(model, x) - y0).abs().max() < 0.05 * y0.abs().max()


def test_compacter_rejects_indivisible_sizes():
    with pytest.raises(ConfigError, match="multiple of phm_dim=4"):
        cfg("compacter", bottleneck_size=6, phm_dim=4)


# ---------------------------------------------------------------- prompt tuning
def _prompt_reference(model, backbone, P, x, **extra):
    """The frozen model driven by inputs_embeds = [P ; E(x)], virtual positions dropped."""
    E = backbone.get_input_embeddings()(x)
    emb = torch.cat([P.expand(x.shape[0], -1, -1), E], dim=1)
    with dk.disabled(model):
        out = backbone(inputs_embeds=emb, **extra)
    return out.last_hidden_state[:, P.shape[0]:]


def test_prompt_tuning_counts_and_vocab_init(tmp_path):
    model = make_model("llama")
    n = 5
    ad = dk.attach(model, cfg("prompt_tuning", num_virtual_tokens=n))
    check_counts(ad, tmp_path, n * D)                          # Lester et al.: n * d
    P = next(iter(ad.deltas()))[1].prompt_embeddings
    W = model.get_input_embeddings().weight
    # vocab init: every prompt vector is the embedding of some token
    assert all((W == p).all(dim=1).any() for p in P)
    r = dk.attach(make_model("llama"), cfg("prompt_tuning", num_virtual_tokens=n, init="random"))
    P = next(iter(r.deltas()))[1].prompt_embeddings
    assert P.abs().max() <= 0.5 and P.std() > 0.1             # U(-0.5, 0.5)


def test_prompt_tuning_matches_inputs_embeds_reference():
    model = make_model("gpt2")
    x = make_input("gpt2")
    ad = dk.attach(model, cfg("prompt_tuning", num_virtual_tokens=3))
    P = next(iter(ad.deltas()))[1].prompt_embeddings
    out = model(x, output_hidden_states=True)
    assert out.logits.shape == (3, 6, 64)                     # the base's shape
    ref = _prompt_reference(model, model.transformer.base, P, x)
    torch.testing.assert_close(out.hidden_states[-1], ref)
    torch.testing.assert_close(out.logits, model.lm_head(ref))
    # labels need no padding; the loss is the base's formula on the stripped logits
    loss = model(x, labels=x).loss
    ref_loss = F.cross_entropy(out.logits[:, :-1].reshape(-1, 64), x[:, 1:].reshape(-1))
    torch.testing.assert_close(loss, ref_loss)


def test_prompt_tuning_bert_with_mask_and_token_types():
    model = make_model("bert")
    x = make_input("bert")
    mask = torch.ones_like(x)
    mask[0, -2:] = 0
    tt = torch.zeros_like(x)
    tt[:, 3:] = 1
    ad = dk.attach(model, cfg("prompt_tuning", num_virtual_tokens=4))
    P = next(iter(ad.deltas()))[1].prompt_embeddings
    out = model.bert(x, attention_mask=mask, token_type_ids=tt)
    ref = _prompt_reference(model, model.bert.base, P, x,
                            attention_mask=torch.cat([torch.ones(3, 4, dtype=mask.dtype), mask], 1),
                            token_type_ids=torch.cat([torch.zeros(3, 4, dtype=tt.dtype), tt], 1))
    torch.testing.assert_close(out.last_hidden_state, ref)
    # mixed batch with a mask and different prompt lengths equals each row alone
    dk.attach(model, cfg("prompt_tuning", num_virtual_tokens=2, seed=1), name="b")
    rows = ["default", "b", None]
    with dk.mixed_batch(model, rows):
        mixed = model(x, attention_mask=mask, token_type_ids=tt).logits
    for i, r in enumerate(rows):
        if r is None:
            with dk.disabled(model):
                alone = model(x, attention_mask=mask, token_type_ids=tt).logits
        else:
            dk.set_active(model, r)
            alone = model(x, attention_mask=mask, token_type_ids=tt).logits
        torch.testing.assert_close(mixed[i], alone[i], rtol=1e-5, atol=1e-5)


def test_prompt_tuning_generation_with_cache_equals_recompute():
    model = make_model("gpt2")
    x = make_input("gpt2")[:1]
    ad = dk.attach(model, cfg("prompt_tuning", num_virtual_tokens=3))
    perturb(ad)
    cached = model.generate(x, max_new_tokens=3, do_sample=False, use_cache=True, pad_token_id=0)
    seq = x
    for _ in range(3):  # no cache: the prompt is prepended to the whole sequence each step
        nxt = model(seq, use_cache=False).logits[:, -1].argmax(-1, keepdim=True)
        seq = torch.cat([seq, nxt], dim=1)
    assert torch.equal(cached, seq)


# ---------------------------------------------------------------- DePT
def test_dept_counts_init_and_offset(tmp_path):
    model = make_model("gpt2")
    x = make_input("gpt2")
    m, r, s = 2, 3, 8
    ad = dk.attach(model, cfg("dept", num_virtual_tokens=m, r=r, max_length=s))
    check_counts(ad, tmp_path, m * D + s * r + r * D)         # Shi & Lipani: m d + s r + r d
    d = next(iter(ad.deltas()))[1]
    # B = 0: the token embeddings start unchanged, only the short prompt acts
    assert d.lora_embedding_B.abs().max() == 0 and d.lora_embedding_A.abs().max() > 0
    backbone = model.transformer.base
    torch.testing.assert_close(model.transformer(x).last_hidden_state,
                               _prompt_reference(model, backbone, d.prompt_embeddings, x))
    # with an offset: inputs_embeds = [P ; E(x) + (A @ B)[:T]]
    perturb(ad)
    E = backbone.get_input_embeddings()(x) + (d.lora_embedding_A @ d.lora_embedding_B)[:6]
    emb = torch.cat([d.prompt_embeddings.expand(3, -1, -1), E], dim=1)
    with dk.disabled(model):
        ref = backbone(inputs_embeds=emb).last_hidden_state[:, m:]
    torch.testing.assert_close(model.transformer(x).last_hidden_state, ref)
    with pytest.raises(ConfigError, match="max_length=8"):
        model(torch.randint(3, 64, (1, 9)))


def test_dept_param_groups():
    from deltakit.methods.dept import dept_param_groups
    model = make_model("llama")
    ad = dk.attach(model, cfg("dept", num_virtual_tokens=2, r=2, max_length=8))
    groups = dept_param_groups(ad, prompt_lr=0.3, lowrank_lr=1e-4)
    assert [g["lr"] for g in groups] == [0.3, 1e-4]
    assert sum(p.numel() for g in groups for p in g["params"]) == ad.num_parameters()
    torch.optim.AdamW(groups)


# ---------------------------------------------------------------- prefix tuning
def _prefixes(adapter):
    return [d.key_value() for _, d in adapter.deltas() if d.role != "backbone"]  # per layer (H_kv, n, hd)


def _cache_reference(model, x, kv, mask=None, shift=True):
    """The frozen model with the prefixes as a pre-filled KV cache (as the official code
    and peft run prefix tuning): real tokens at n..n+T-1, or at 0..T-1 without ``shift``."""
    from transformers import DynamicCache
    cache = DynamicCache(config=model.config)
    B = x.shape[0]
    for i, (k, v) in enumerate(kv):
        cache.update(k.expand(B, -1, -1, -1), v.expand(B, -1, -1, -1), i)
    n = kv[0][0].shape[1]
    mask = torch.ones_like(x) if mask is None else mask
    pos = {} if shift else {"position_ids": torch.arange(x.shape[1])[None].expand(B, -1)}
    with dk.disabled(model):
        return model(x, past_key_values=cache, attention_mask=torch.cat([torch.ones(B, n, dtype=mask.dtype), mask], 1),
                     **pos).logits


@pytest.mark.parametrize("kind,d_kv", [("llama", 8), ("gpt2", D)])
def test_prefix_tuning_counts_and_cache_reference(kind, d_kv, tmp_path):
    model = make_model(kind)
    x = make_input(kind)
    n = 3
    ad = dk.attach(model, cfg("prefix_tuning", num_virtual_tokens=n))
    check_counts(ad, tmp_path, 2 * L * n * d_kv)              # Li & Liang: P_k, P_v per layer
    torch.testing.assert_close(run(model, x), _cache_reference(model, x, _prefixes(ad)))
    mask = torch.ones_like(x)
    mask[1, :2] = 0                                            # left padding
    torch.testing.assert_close(model(x, attention_mask=mask).logits,
                               _cache_reference(model, x, _prefixes(ad), mask), rtol=1e-5, atol=1e-5)
    # without the backbone among the targets, real tokens keep positions 0..T-1
    only = make_model(kind)
    a2 = dk.attach(only, cfg("prefix_tuning", num_virtual_tokens=n, targets=[ad.spec.cls.default_targets[kind][1]]))
    torch.testing.assert_close(run(only, x), _cache_reference(only, x, _prefixes(a2), shift=False))


@pytest.mark.parametrize("kind", ["gpt2", "llama"])
def test_prompt_and_prefix_tuning_match_peft(kind):
    from peft import PrefixTuningConfig, PromptTuningConfig, TaskType, get_peft_model
    x = make_input(kind)
    n = 3
    model = make_model(kind)
    ad = dk.attach(model, cfg("prompt_tuning", num_virtual_tokens=n))
    peft_model = get_peft_model(make_model(kind), PromptTuningConfig(task_type=TaskType.CAUSAL_LM, num_virtual_tokens=n))
    with torch.no_grad():
        peft_model.prompt_encoder["default"].embedding.weight.copy_(next(iter(ad.deltas()))[1].prompt_embeddings)
    # peft keeps the n virtual positions in causal-LM logits; we strip them
    torch.testing.assert_close(run(model, x), peft_model(input_ids=x).logits[:, n:], rtol=1e-5, atol=1e-5)

    model = make_model(kind)
    ad = dk.attach(model, cfg("prefix_tuning", num_virtual_tokens=n))
    perturb(ad)
    peft_model = get_peft_model(make_model(kind), PrefixTuningConfig(task_type=TaskType.CAUSAL_LM, num_virtual_tokens=n))
    # peft's prefix embedding row i holds layer-major (L, 2, H_kv, hd) values of virtual token i
    w = torch.stack([torch.stack(kv) for kv in _prefixes(ad)])     # (L, 2, H_kv, n, hd)
    with torch.no_grad():
        peft_model.prompt_encoder["default"].embedding.weight.copy_(w.permute(3, 0, 1, 2, 4).reshape(n, -1))
    torch.testing.assert_close(run(model, x), peft_model(input_ids=x).logits, rtol=1e-5, atol=1e-5)


def test_prefix_tuning_generation_with_cache_equals_recompute():
    model = make_model("llama")
    x = make_input("llama")[:1]
    dk.attach(model, cfg("prefix_tuning", num_virtual_tokens=2))
    cached = model.generate(x, max_new_tokens=3, do_sample=False, use_cache=True)
    seq = x
    for _ in range(3):
        nxt = model(seq, use_cache=False).logits[:, -1].argmax(-1, keepdim=True)
        seq = torch.cat([seq, nxt], dim=1)
    assert torch.equal(cached, seq)


def test_prefix_tuning_bert_attention_by_hand():
    model = make_model("bert")
    ad = dk.attach(model, cfg("prefix_tuning", num_virtual_tokens=2))
    attn = model.bert.encoder.layer[0].attention.self        # the wrapped BertSelfAttention
    d = attn.deltas["default"]
    h = torch.randn(2, 4, D)
    K, V = d.key_value()                                      # (H, n, hd)

    def heads(t):
        return t.view(2, -1, 2, 8).transpose(1, 2)            # (B, H, T, hd)
    q, k, v = heads(attn.base.query(h)), heads(attn.base.key(h)), heads(attn.base.value(h))
    k = torch.cat([K.expand(2, -1, -1, -1), k], 2)
    v = torch.cat([V.expand(2, -1, -1, -1), v], 2)
    w = torch.softmax(q @ k.transpose(-1, -2) / 8 ** 0.5, -1)
    ref = (w @ v).transpose(1, 2).reshape(2, 4, D)
    torch.testing.assert_close(attn(h)[0], ref)


def test_prefix_reparam_counts_and_fold(tmp_path):
    from deltakit.methods.prefix_tuning import fold_prefix
    model = make_model("llama")
    x = make_input("llama")
    n, hid, d_kv = 3, 5, 8
    ad = dk.attach(model, cfg("prefix_tuning", num_virtual_tokens=n, reparam=True, reparam_hidden=hid))
    # P' (n, d_kv) -> Linear(d_kv, hid) -> tanh -> Linear(hid, L * 2 * d_kv)
    check_counts(ad, tmp_path / "train", n * d_kv + d_kv * hid + hid + hid * L * 2 * d_kv + L * 2 * d_kv)
    y = run(model, x).detach()
    fold_prefix(ad)
    torch.testing.assert_close(run(model, x), y, rtol=0, atol=0)
    check_counts(ad, tmp_path / "folded", 2 * L * n * d_kv)
    fresh = make_model("llama")
    dk.load_adapter(fresh, tmp_path / "folded" / "ad")
    torch.testing.assert_close(run(fresh, x), y, rtol=0, atol=0)


# ---------------------------------------------------------------- unified space
def _copy_branch(dst, down_w, up_w, down_b=None, up_b=None):
    with torch.no_grad():
        dst.branch.down.weight.copy_(down_w)
        dst.branch.up.weight.copy_(up_w)
        if down_b is not None:
            dst.branch.down.bias.copy_(down_b)
            dst.branch.up.bias.copy_(up_b)


def test_unified_lora_point_equals_lora():
    model = make_model("llama")
    x = make_input("llama")
    lora = dk.attach(model, dk.LoraConfig(r=2, alpha=6.0, targets=["q_proj", "v_proj"]), name="lora")
    perturb(lora)
    y_lora = run(model, x).detach()
    uni = dk.attach(model, cfg("unified", position="attention", attention_site="qv", modification="lowrank",
                               insertion="parallel", composition="scaled", scale=6.0 / 2, r=2), name="uni")
    assert sorted(uni.targets) == sorted(lora.targets)
    for (_, a), (_, b) in zip(lora.deltas(), uni.deltas()):
        _copy_branch(b, a.lora_A, a.lora_B)
    torch.testing.assert_close(run(model, x), y_lora, rtol=1e-5, atol=1e-5)
    assert uni.num_parameters() == lora.num_parameters()


def test_unified_houlsby_point_equals_houlsby():
    model = make_model("bert")
    x = make_input("bert")
    h = dk.attach(model, cfg("houlsby", bottleneck_size=3), name="h")
    perturb(h)
    y_h = run(model, x).detach()
    u = dk.attach(model, cfg("unified", position="both", modification="mlp", insertion="sequential",
                             composition="additive", r=3), name="u")
    assert sorted(u.targets) == sorted(h.targets)
    for (_, a), (_, b) in zip(h.deltas(), u.deltas()):
        _copy_branch(b, a.branch.down.weight, a.branch.up.weight, a.branch.down.bias, a.branch.up.bias)
    torch.testing.assert_close(run(model, x), y_h, rtol=1e-5, atol=1e-5)


def test_mam_equals_prefix_plus_scaled_parallel(tmp_path):
    model = make_model("gpt2")
    x = make_input("gpt2")
    n, r = 2, 4
    pt = dk.attach(model, cfg("prefix_tuning", num_virtual_tokens=n), name="pt")
    sp = dk.attach(model, cfg("scaled_parallel", bottleneck_size=r), name="sp")
    perturb(pt)
    perturb(sp, seed=1)
    dk.set_active(model, ["pt", "sp"])
    y = run(model, x).detach()
    mam = dk.attach(model, cfg("mam", prefix_length=n, r=r), name="mam")
    # He et al.: L (2 n d) prefixes + L (2 r d + r + d) scaled parallel adapters
    check_counts(mam, tmp_path, L * (2 * n * D) + L * (2 * r * D + r + D))
    deltas = dict(mam.deltas())
    with torch.no_grad():
        for path, d in pt.deltas():
            if d.role == "backbone":       # parameter-free position shift, in both
                assert deltas[path].role == "backbone"
                continue
            deltas[path].prefix_key.copy_(d.prefix_key)
            deltas[path].prefix_value.copy_(d.prefix_value)
        for path, d in sp.deltas():
            b = d.branch
            _copy_branch(deltas[path], b.down.weight, b.up.weight, b.down.bias, b.up.bias)
    torch.testing.assert_close(run(model, x), y, rtol=1e-5, atol=1e-5)


def test_unified_gated_composition_by_hand():
    lin = nn.Sequential(nn.Linear(2, 2))
    with torch.no_grad():
        lin[0].weight.copy_(torch.eye(2))
        lin[0].bias.zero_()
    ad = dk.attach(lin, cfg("unified", position="ffn", modification="lowrank", insertion="parallel",
                            composition="gated", r=1, targets=["0"]))
    d = next(iter(ad.deltas()))[1]
    with torch.no_grad():
        d.branch.down.weight.copy_(torch.tensor([[1.0, 0.0]]))
        d.branch.up.weight.copy_(torch.tensor([[0.0], [4.0]]))
        d.gate.weight.zero_()
        d.gate.bias.zero_()                                   # lam = sigmoid(0) = 1/2
    # x = (2, 1): h = (2, 1); dh = (0, 8); h' = (h + dh) / 2 = (1, 4.5)
    torch.testing.assert_close(lin(torch.tensor([[2.0, 1.0]])), torch.tensor([[1.0, 4.5]]))


def test_unified_config_targets_follow_knobs():
    c = cfg("unified", position="ffn", insertion="sequential")
    assert len(c.targets) == 1 and "mlp" in c.targets[0]
    c2 = c.replace(position="both", prefix_length=2)
    assert len(c2.targets) == 4                 # backbone, prefix, attention, ffn: re-derived, not stale
    assert type(c).from_dict(c2.to_dict()) == c2
    with pytest.raises(ConfigError, match="changes nothing"):
        cfg("unified", position="none")
    with pytest.raises(ConfigError, match=r"expected one of \['none', 'attention', 'ffn', 'both'\]"):
        cfg("unified", position="everywhere")


def test_unified_scaling_modification_by_hand(tmp_path):
    lin = nn.Sequential(nn.Linear(2, 2))
    with torch.no_grad():
        lin[0].weight.copy_(torch.eye(2))
        lin[0].bias.zero_()
    x = torch.tensor([[2.0, 3.0]])
    ad = dk.attach(lin, cfg("unified", position="ffn", modification="scaling", insertion="sequential",
                            composition="additive", targets=["0"]))
    check_counts(ad, tmp_path, 2)                             # one vector l of width d
    torch.testing.assert_close(lin(x), x)                     # l = 0: starts at the base
    with torch.no_grad():
        next(iter(ad.deltas()))[1].branch.scale_vector.copy_(torch.tensor([0.5, -1.0]))
    # h' = h + l * h = (2 + 1, 3 - 3)
    torch.testing.assert_close(lin(x), torch.tensor([[3.0, 0.0]]))


@pytest.mark.parametrize("kind", ["bert", "llama"])
def test_prefix_tuning_mixed_batch_with_padding_mask(kind):
    model = make_model(kind)
    x = make_input(kind)
    mask = torch.ones_like(x)
    mask[2, :2] = 0
    a = dk.attach(model, cfg("prefix_tuning", num_virtual_tokens=3), name="a")
    b = dk.attach(model, cfg("prefix_tuning", num_virtual_tokens=1), name="b")
    perturb(a)
    perturb(b, seed=1)
    rows = ["b", None, "a"]
    with dk.mixed_batch(model, rows):
        mixed = model(x, attention_mask=mask).logits
    for i, r in enumerate(rows):
        if r is None:
            with dk.disabled(model):
                alone = model(x, attention_mask=mask).logits
        else:
            dk.set_active(model, r)
            alone = model(x, attention_mask=mask).logits
        torch.testing.assert_close(mixed[i], alone[i], rtol=1e-5, atol=1e-5)
