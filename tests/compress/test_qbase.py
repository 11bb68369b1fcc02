"""Quantised base (QLoRA / LQ-LoRA): hand-worked codes, forward/backward parity, LoRA training
on a quantised tiny Llama, LQ-LoRA's reconstruction, the merge refusal, save/load."""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader

import deltakit as dk
from deltakit.compress._bits import pack
from deltakit.compress.qbase import (NF4, QuantConfig, QuantLinear, QuantParts, _pack4, base_bytes, dequantize_base,
                                     dequantize_tensor, lq_decompose, lq_lora, quantize_base, quantize_tensor)
from deltakit.core.fields import ConfigError
from deltakit.core.layer import DeltaStateError

from ..conftest import tiny_llama


def _llama(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return tiny_llama().eval()


def _ids(seed: int = 1, batch: int = 3) -> torch.Tensor:
    return torch.randint(3, 64, (batch, 6), generator=torch.Generator().manual_seed(seed))


# ----------------------------------------------------------------------------- hand-worked codes
def test_symmetric_int4_by_hand():
    # absmax 3.5, qmax 7 -> s = 0.5; w / s = 3, -7, 1.2, 0 -> codes + 8 = 11, 1, 9, 8
    w = torch.tensor([[1.5, -3.5, 0.6, 0.0]])
    parts = quantize_tensor(w, QuantConfig(bits=4, group_size=4))
    assert parts.scales.dtype == torch.float16 and parts.scales.tolist() == [0.5]
    assert parts.codes.tolist() == [11 | 1 << 4, 9 | 8 << 4] == [27, 137]
    assert parts.offsets is None
    assert dequantize_tensor(parts, QuantConfig(bits=4, group_size=4), (1, 4)).tolist() == [[1.5, -3.5, 0.5, 0.0]]


def test_asymmetric_int4_by_hand():
    # min -1, max 6.5 -> s = 7.5 / 15 = 0.5; (w + 1) / s = 0, 15, 2, 4.6 -> codes 0, 15, 2, 5
    w = torch.tensor([-1.0, 6.5, 0.0, 1.3])
    cfg = QuantConfig(bits=4, group_size=4, scheme="asymmetric")
    parts = quantize_tensor(w, cfg)
    assert parts.scales.tolist() == [0.5] and parts.offsets.tolist() == [-1.0]
    assert parts.codes.tolist() == [0 | 15 << 4, 2 | 5 << 4]
    assert dequantize_tensor(parts, cfg, (4,)).tolist() == [-1.0, 6.5, 0.0, 1.5]


def test_nf4_by_hand():
    # absmax 2; w / 2 = 1, -0.5, 0.25, 0 -> nearest NF4 levels 15 (1.0), 2 (-0.525), 10 (0.246), 7 (0)
    w = torch.tensor([2.0, -1.0, 0.5, 0.0])
    cfg = QuantConfig(bits=4, group_size=4, scheme="nf4")
    parts = quantize_tensor(w, cfg)
    assert parts.scales.tolist() == [2.0]
    assert parts.codes.tolist() == [15 | 2 << 4, 10 | 7 << 4]
    assert dequantize_tensor(parts, cfg, (4,)).tolist() == pytest.approx(
        [2.0, -2 * 0.5250730514526367, 2 * 0.24611230194568634, 0.0], abs=0)
    # the QLoRA table: 16 levels from -1 to 1 with an exact zero at code 7, ascending
    assert NF4.numel() == 16 and NF4[0] == -1 and NF4[7] == 0 and NF4[15] == 1 and bool((NF4.diff() > 0).all())


def test_int8_tail_group_is_padded_and_codes_are_whole_bytes():
    w = torch.tensor([[1.0, -2.0, 0.5], [0.25, 3.0, -1.0]])       # 6 entries, groups of 4: 2 groups
    cfg = QuantConfig(bits=8, group_size=4)
    parts = quantize_tensor(w, cfg)
    assert parts.codes.numel() == 8 and parts.scales.numel() == 2
    s = torch.tensor([2.0 / 127, 3.0 / 127]).half().float()
    assert parts.scales.float().tolist() == s.tolist()
    assert parts.codes[6:].tolist() == [128, 128]                   # the zero padding
    back = dequantize_tensor(parts, cfg, (2, 3))
    assert back.shape == (2, 3)
    assert (back - w).abs().max() <= s.max() / 2 + 1e-6


def test_4bit_packing_is_the_bits_module_layout():
    codes = torch.randint(0, 16, (64,), generator=torch.Generator().manual_seed(0)).to(torch.uint8)
    assert torch.equal(_pack4(codes), pack(codes, 4))
    one = QuantParts(_pack4(codes), torch.ones(1, dtype=torch.float16), None)   # scale 1: values = codes - 8
    assert torch.equal(dequantize_tensor(one, QuantConfig(bits=4, group_size=64), (64,)), codes.float() - 8)


@pytest.mark.parametrize("cfg,bound", [(QuantConfig(bits=8), 0.5 / 127), (QuantConfig(bits=4), 0.5 / 7),
                                       (QuantConfig(bits=4, scheme="asymmetric"), 0.5 / 15 * 2),
                                       (QuantConfig(bits=4, scheme="nf4"), 0.1519)])
def test_error_within_the_documented_bound_and_input_untouched(cfg, bound):
    w = torch.randn(24, 40, generator=torch.Generator().manual_seed(3))
    before = w.clone()
    back = dequantize_tensor(quantize_tensor(w, cfg), cfg, w.shape)
    assert torch.equal(w, before)
    g = F.pad(w.reshape(-1), (0, -w.numel() % cfg.group_size)).view(-1, cfg.group_size)
    absmax = g.abs().max(1).values                                 # bound relative to the group's absmax
    err = F.pad((back - w).abs().reshape(-1), (0, -w.numel() % cfg.group_size)).view(-1, cfg.group_size)
    assert bool((err.max(1).values <= absmax * bound * 1.002 + 1e-7).all())


def test_config_is_checked():
    with pytest.raises(ConfigError, match="expected 4 with scheme 'nf4'"):
        QuantConfig(bits=8, scheme="nf4")
    with pytest.raises(ConfigError, match="bits"):
        QuantConfig(bits=3)
    assert QuantConfig(bits=4, group_size=64).bits_per_weight() == 4.25
    assert QuantConfig(bits=4, group_size=64, scheme="asymmetric").bits_per_weight() == 4.5


# ----------------------------------------------------------------------------- the module
@pytest.mark.parametrize("scheme,bits", [("symmetric", 8), ("symmetric", 4), ("nf4", 4), ("asymmetric", 4)])
def test_quant_linear_is_f_linear_with_the_dequantised_weight(scheme, bits):
    torch.manual_seed(0)
    lin = nn.Linear(40, 12)
    q = QuantLinear.from_linear(lin, QuantConfig(bits=bits, group_size=16, scheme=scheme))
    x = torch.randn(5, 40, requires_grad=True)
    W = q.dequantize()
    assert W.shape == (12, 40) and W.dtype == torch.float32
    ref = F.linear(x, W, q.bias)
    out = q(x)
    assert torch.equal(out, ref)
    g = torch.randn_like(out)
    (gx,) = torch.autograd.grad(out, x, g)
    (gref,) = torch.autograd.grad(ref, x, g)
    assert torch.allclose(gx, gref, atol=1e-6, rtol=0)
    with torch.no_grad():
        assert torch.equal(q(x), ref)
    assert [n for n, _ in q.named_parameters()] == ["bias"]
    q.to(torch.bfloat16)                                            # converts floating buffers: none here
    assert torch.equal(q.dequantize(torch.float32), W) and q.scales.dtype == torch.int16
    assert {n for n, _ in q.named_buffers()} == {"codes", "scales"} | ({"offsets"} if scheme == "asymmetric" else set())


def test_quantize_base_bytes_and_targets():
    m = _llama()
    before = base_bytes(m)
    paths = quantize_base(m, QuantConfig(bits=4, group_size=64))
    # 2 layers x (q, k, v, o, gate, up, down); the output head stays (QLoRA keeps it too)
    assert len(paths) == 14 and all(isinstance(m.get_submodule(p), QuantLinear) for p in paths)
    assert "lm_head" not in paths and isinstance(m.lm_head, nn.Linear)
    sizes = [256, 128, 128, 256, 512, 512, 512]                     # weights per linear of one layer
    fp32 = 4 * sum(sizes)
    int4 = sum(n // 2 + 2 * math.ceil(n / 64) for n in sizes)
    assert before - base_bytes(m) == 2 * (fp32 - int4) == 15984
    tied = _llama()
    tied.lm_head.weight = tied.model.embed_tokens.weight            # as SmolLM2 ties them
    with pytest.raises(ValueError, match="lm_head.weight is tied to model.embed_tokens"):
        quantize_base(tied, targets=["lm_head"])


# ----------------------------------------------------------------------------- LoRA on it
def _lm_loader(n: int = 24, seed: int = 0) -> DataLoader:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, 64, (n, 8), generator=g)
    ids[:, 1::2] = (ids[:, 0::2] * 7 + 3) % 61 + 3                  # a learnable next-token rule
    rows = [{"input_ids": r, "labels": r} for r in ids]
    return DataLoader(rows, batch_size=8, shuffle=False)


def test_lora_trains_on_a_quantised_llama_and_only_lora_gets_gradients():
    m = _llama()
    with torch.no_grad():
        m.lm_head.weight.mul_(25)   # a random head of std 0.02 caps any change of the logits near ln(64)
    quantize_base(m, QuantConfig(bits=4, scheme="nf4"))
    stored = {k: v.clone() for k, v in m.named_buffers()}
    ad = dk.attach(m, dk.LoraConfig(r=4, alpha=8, targets=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj",
                                                            "up_proj", "down_proj"]))
    lora = {id(p) for p in ad.parameters()}
    batch = next(iter(_lm_loader()))
    m(**batch).loss.backward()
    with_grad = {id(p) for p in m.parameters() if p.grad is not None}
    assert with_grad == lora and len(lora) == 28
    m.zero_grad(set_to_none=True)
    res = dk.fit(m, _lm_loader(8), lr=1e-2, max_steps=30, log_every=5, progress=False)
    losses = [h["loss"] for h in res.history if "loss" in h]
    assert losses[-1] < 0.5 * losses[0], losses                     # measured: 5.55 -> 1.86
    assert all(torch.equal(v, stored[k]) for k, v in m.named_buffers() if k in stored)
    assert {k.replace(".base.", ".") for k, _ in m.named_buffers()} == set(stored)


def test_merge_is_refused_and_dequantize_base_makes_it_possible():
    m = _llama()
    quantize_base(m, QuantConfig(bits=4))
    ad = dk.attach(m, dk.LoraConfig(r=2, targets=["q_proj", "v_proj"]))
    with torch.no_grad():
        for _, d in ad.deltas():
            d.lora_B.normal_()
    x = _ids()
    unmerged = m(x).logits
    with pytest.raises(DeltaStateError, match="cannot merge into a QuantLinear.*dequantize_base"):
        ad.merge()
    assert not ad.merged and torch.equal(m(x).logits, unmerged)
    with dk.disabled(m):
        base_q = m(x).logits
    assert len(dequantize_base(m)) == 14
    assert not any(isinstance(mod, QuantLinear) for mod in m.modules())
    with dk.disabled(m):
        assert torch.allclose(m(x).logits, base_q, atol=1e-5, rtol=0)  # the same weights, W = Q exactly
    assert torch.allclose(m(x).logits, unmerged, atol=1e-5, rtol=0)
    ad.merge()
    assert torch.allclose(m(x).logits, unmerged, atol=1e-4, rtol=0)


def test_quantize_base_refuses_a_model_with_adapters():
    m = _llama()
    dk.attach(m, dk.LoraConfig(r=2, targets=["q_proj"]))
    with pytest.raises(ValueError, match="quantise the base first, then attach"):
        quantize_base(m)


def test_save_load_round_trip_fingerprints_the_quantised_base(tmp_path):
    cfg = QuantConfig(bits=4, scheme="nf4")
    m = _llama()
    quantize_base(m, cfg)
    ad = dk.attach(m, dk.LoraConfig(r=2, targets=["q_proj", "v_proj"]))
    with torch.no_grad():
        for _, d in ad.deltas():
            d.lora_B.normal_()
    x = _ids()
    want = m(x).logits
    dk.save_adapter(ad, tmp_path / "qlora")
    again = _llama()
    quantize_base(again, cfg)                                      # deterministic: the same codes
    dk.load_adapter(again, tmp_path / "qlora")
    assert torch.equal(again(x).logits, want)
    with pytest.raises(dk.AdapterLoadError, match="expects a QuantLinear, model has Linear"):
        dk.load_adapter(_llama(), tmp_path / "qlora")
    other = _llama()
    quantize_base(other, QuantConfig(bits=8))
    with pytest.raises(dk.AdapterLoadError, match="base model differs"):
        dk.load_adapter(other, tmp_path / "qlora")


# ----------------------------------------------------------------------------- LQ-LoRA
def test_lq_decompose_beats_plain_quantisation():
    g = torch.Generator().manual_seed(0)
    # a weight with a strong low-rank part plus noise, as trained weights have
    w = torch.randn(48, 4, generator=g) @ torch.randn(4, 64, generator=g) + 0.1 * torch.randn(48, 64, generator=g)
    cfg = QuantConfig(bits=4, group_size=64)
    fit = lq_decompose(w, 4, cfg, iterations=5)
    plain = float((w - dequantize_tensor(quantize_tensor(w, cfg), cfg, w.shape)).norm() / w.norm())
    got = float((w - dequantize_tensor(fit.parts, cfg, w.shape) - fit.B @ fit.A).norm() / w.norm())
    assert fit.errors[0] == pytest.approx(plain, rel=1e-6)
    assert got == pytest.approx(min(fit.errors), rel=1e-5)
    # measured: 0.1215 plain, then 0.0957, 0.0912, 0.0887, 0.0871, 0.0861 over the 5 iterations
    assert all(b < a for a, b in zip(fit.errors, fit.errors[1:])), fit.errors
    assert got < 0.75 * plain, (got, plain, fit.errors)


def test_lq_lora_starts_closer_to_the_full_precision_model():
    full = _llama()
    x = _ids()
    ref = full(x).logits
    m = _llama()
    weights = {n: mod.weight.detach().clone() for n, mod in m.named_modules() if isinstance(mod, nn.Linear)}
    cfg = QuantConfig(bits=4, group_size=64)
    ad, fits = lq_lora(m, dk.LoraConfig(r=4, alpha=8, targets=["q_proj", "v_proj"]), cfg, iterations=3)
    assert sorted(fits) == sorted(p for p in weights if p.endswith(("q_proj", "v_proj")))
    for path, d in ad.deltas():
        Q = m.get_submodule(path).base.dequantize()
        plain = dequantize_tensor(quantize_tensor(weights[path], cfg), cfg, Q.shape)
        assert (weights[path] - Q - d.product()).norm() < (weights[path] - plain).norm()
    with dk.disabled(m):
        q_only = m(x).logits
    plain_m = _llama()
    quantize_base(plain_m, cfg)
    lq = (m(x).logits - ref).norm()
    assert lq < (plain_m(x).logits - ref).norm()
    assert lq < (q_only - ref).norm()                               # the LoRA part is what brings it closer
