"""LoRA on tiny tensors, checked by hand."""
import math

import torch
from torch import nn

import deltakit as dk


def _lin():
    lin = nn.Linear(3, 2, bias=True)
    with torch.no_grad():
        lin.weight.copy_(torch.tensor([[1.0, 0.0, -1.0], [2.0, 1.0, 0.0]]))
        lin.bias.copy_(torch.tensor([0.5, -0.5]))
    return nn.Sequential(lin)


def test_hand_checked_linear():
    m = _lin()
    ad = dk.attach(m, dk.LoraConfig(r=1, alpha=2.0, targets=["0"]))
    (_, d), = ad.deltas()
    with torch.no_grad():
        d.lora_A.copy_(torch.tensor([[1.0, 2.0, 3.0]]))   # (r=1, in=3)
        d.lora_B.copy_(torch.tensor([[1.0], [-1.0]]))     # (out=2, r=1)
    # s = alpha / r = 2; dW = 2 * B @ A = [[2, 4, 6], [-2, -4, -6]]
    x = torch.tensor([[1.0, 1.0, 1.0]])
    # base: W x + b = [0 + .5, 3 - .5] = [0.5, 2.5];  dW x = [12, -12]
    torch.testing.assert_close(m(x), torch.tensor([[12.5, -9.5]]))
    (name, dw), = ad.delta_weights()
    assert name == "0.weight"
    torch.testing.assert_close(dw, torch.tensor([[2.0, 4, 6], [-2, -4, -6]]))
    ad.merge()
    torch.testing.assert_close(m[0].base.weight, torch.tensor([[3.0, 4, 5], [0, -3, -6]]))
    ad.unmerge()
    torch.testing.assert_close(m[0].base.weight, torch.tensor([[1.0, 0, -1], [2, 1, 0]]), rtol=0, atol=0)


def test_rslora_scale_and_zero_init():
    m = _lin()
    x = torch.randn(4, 3)
    y0 = m(x)
    ad = dk.attach(m, dk.LoraConfig(r=4, alpha=8.0, use_rslora=True, targets=["0"]))
    (_, d), = ad.deltas()
    assert math.isclose(d.scale, 8.0 / 2.0)          # alpha / sqrt(r)
    torch.testing.assert_close(m(x), y0)              # B = 0: starts at the base


def test_gpt2_conv1d_layout():
    from transformers.pytorch_utils import Conv1D
    conv = Conv1D(2, 3)                                # weight (in=3, out=2)
    m = nn.Sequential(conv)
    ad = dk.attach(m, dk.LoraConfig(r=1, alpha=1.0, targets=["0"]))
    (_, d), = ad.deltas()
    with torch.no_grad():
        d.lora_A.copy_(torch.tensor([[1.0, 0.0, 0.0]]))
        d.lora_B.copy_(torch.tensor([[0.0], [1.0]]))
    (_, dw), = ad.delta_weights()
    # dW in Conv1D layout (in, out): only input 0 -> output 1
    torch.testing.assert_close(dw, torch.tensor([[0.0, 1.0], [0, 0], [0, 0]]))


def test_two_active_adapters_add():
    m = _lin()
    x = torch.randn(5, 3)
    a = dk.attach(m, dk.LoraConfig(r=2, targets=["0"]), name="a")
    b = dk.attach(m, dk.LoraConfig(r=3, targets=["0"]), name="b")
    for p in [*a.parameters(), *b.parameters()]:
        torch.nn.init.normal_(p)
    with dk.disabled(m):
        y0 = m(x)
    dk.set_active(m, "a"); ya = m(x)
    dk.set_active(m, "b"); yb = m(x)
    dk.set_active(m, ["a", "b"]); yab = m(x)
    torch.testing.assert_close(yab - y0, (ya - y0) + (yb - y0), rtol=1e-5, atol=1e-5)
    assert dk.active(m) == ["a", "b"]


def test_param_counts_bert(model_factory):
    m = model_factory("bert")
    total0 = sum(p.numel() for p in m.parameters())
    ad = dk.attach(m, dk.LoraConfig(r=4))              # default targets: query, value
    # 2 layers x 2 targets x r * (in + out) with hidden 16
    assert ad.num_parameters() == 2 * 2 * 4 * (16 + 16)
    assert dk.param_counts(m) == (ad.num_parameters(), total0 + ad.num_parameters())
    assert sorted(ad.targets) == sorted(
        f"bert.encoder.layer.{i}.attention.self.{t}" for i in range(2) for t in ("query", "value"))


def test_task_vector_stays_factored_and_matches_delta(model_factory):
    from deltakit.taskvec import LowRank, as_dense

    for kind in ("bert", "gpt2", "conv"):
        m = model_factory(kind)
        targets = ["conv1", "conv2"] if kind == "conv" else None
        ad = dk.attach(m, dk.LoraConfig(r=2, targets=targets))
        for p in ad.parameters():
            torch.nn.init.normal_(p)
        tv = dk.TaskVector.from_adapter(ad)
        dense = dict(ad.delta_weights())
        assert set(tv.keys()) == set(dense)
        for name, dw in dense.items():
            entry = tv.get(name)
            assert isinstance(entry, LowRank)
            torch.testing.assert_close(as_dense(entry), dw, rtol=1e-5, atol=1e-5)
        # applying the task vector to the plain model == merging the adapter
        x = torch.randn(2, 3, 8, 8) if kind == "conv" else torch.randint(3, 60, (2, 5))
        y = m(x) if kind == "conv" else m(x).logits
        dk.detach(m, "default")
        state = tv.apply(m.state_dict())
        m.load_state_dict(state)
        y2 = m(x) if kind == "conv" else m(x).logits
        torch.testing.assert_close(y2, y, rtol=1e-4, atol=1e-4)


def test_embedding_lora_merge_and_mixed_batch(model_factory):
    m = model_factory("llama")
    x = torch.randint(3, 64, (3, 5))
    y0 = m(x).logits
    a = dk.attach(m, dk.LoraConfig(r=2, targets=["embed_tokens"]), name="a")
    b = dk.attach(m, dk.LoraConfig(r=3, targets=["embed_tokens", "q_proj"]), name="b")
    for p in [*a.parameters(), *b.parameters()]:
        torch.nn.init.normal_(p, std=0.3)
    dk.set_active(m, "a"); ya = m(x).logits
    dk.set_active(m, "b"); yb = m(x).logits
    with dk.mixed_batch(m, ["b", None, "a"]):
        ym = m(x).logits
    for i, ref in enumerate([yb, y0, ya]):
        torch.testing.assert_close(ym[i], ref[i], rtol=1e-5, atol=1e-5)
    b.merge()
    torch.testing.assert_close(m(x).logits, yb, rtol=1e-4, atol=1e-4)
    b.unmerge()
    torch.testing.assert_close(m(x).logits, yb, rtol=0, atol=1e-6)


def test_bf16_modules_to_save_head_is_exact(model_factory):
    m = model_factory("bert").to(torch.bfloat16)
    ad = dk.attach(m, dk.LoraConfig(r=2, modules_to_save=["classifier"]))
    full = dict(ad.deltas(include_full=True))["classifier"]
    with torch.no_grad():
        full.values["weight"].normal_()
    x = torch.randn(2, 16, dtype=torch.bfloat16)
    layer = m.get_submodule("classifier")
    expect = torch.nn.functional.linear(x, full.values["weight"].to(torch.bfloat16),
                                        full.values["bias"].to(torch.bfloat16))
    torch.testing.assert_close(layer(x), expect, rtol=0, atol=0)


def test_inference_fold_matches_residual_path():
    """Under no_grad with many tokens the layer folds dW into W; same numbers as the factored path."""
    from deltakit.core.layer import _fold_is_cheaper

    torch.manual_seed(0)
    lin = nn.Sequential(nn.Linear(16, 16))
    ad = dk.attach(lin, dk.LoraConfig(r=2, targets=["0"]))
    for p in ad.parameters():
        torch.nn.init.normal_(p)
    x = torch.randn(4, 32, 16)                                 # 128 tokens > 16*16/32
    layer = lin[0]
    with torch.no_grad():
        assert _fold_is_cheaper(layer.base, x) and not _fold_is_cheaper(layer.base, x[:1, :2])
    factored = lin(x)                                         # grad enabled: residual path
    with torch.no_grad():
        folded = lin(x)
    torch.testing.assert_close(folded, factored.detach(), rtol=1e-4, atol=1e-4)
    with torch.enable_grad():
        assert not _fold_is_cheaper(layer.base, x)


def test_compute_dtype_input_runs_branch_in_bf16_with_fp32_factors():
    """compute_dtype='input': bf16 matmuls, fp32 factors and fp32 gradients on them."""
    torch.manual_seed(0)
    outs = {}
    for mode in ("adapter", "input"):
        torch.manual_seed(0)
        m = nn.Sequential(nn.Linear(16, 8)).to(torch.bfloat16)
        ad = dk.attach(m, dk.LoraConfig(r=2, targets=["0"], compute_dtype=mode))
        (_, d), = ad.deltas()
        with torch.no_grad():
            d.lora_B.normal_()
        assert d.lora_A.dtype == torch.float32
        x = torch.randn(3, 16).to(torch.bfloat16)
        res_dtype = d.residual(m[0].base, x).dtype
        y = m(x)
        y.float().sum().backward()
        assert d.lora_A.grad.dtype == torch.float32 and d.lora_A.grad.abs().sum() > 0
        outs[mode] = (y.detach().float(), res_dtype)
    assert outs["adapter"][1] == torch.float32 and outs["input"][1] == torch.bfloat16
    ref = outs["adapter"][0]
    # bf16 rounding of the branch: a few ulps (2**-8 relative) of the output's scale
    assert (outs["input"][0] - ref).abs().max() <= 2 ** -6 * ref.abs().max()
