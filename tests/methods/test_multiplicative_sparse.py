"""Multiplicative / structural (IA3, SSF, BitFit, LN tuning, ETHER, OFT) and sparse /
selective (sparse masks, SaRA, gradient masks, HFT, LISA, intrinsic dimension) methods.

For each method: parameter counts from the paper's formula (trainable and stored in
the file), the paper's initialisation property, and hand-worked numbers on tiny tensors.
"""
from __future__ import annotations

import math

import pytest
import torch
from safetensors import safe_open
from torch import nn

import deltakit as dk
from deltakit.methods.bitfit import BitFitConfig
from deltakit.methods.ether import EtherConfig, householder
from deltakit.methods.hft import HFTConfig
from deltakit.methods.ia3 import IA3Config
from deltakit.methods.intrinsic import IntrinsicConfig, fastfood, fwht
from deltakit.methods.lisa import LisaConfig, LisaSchedule
from deltakit.methods.ln_tuning import LNTuningConfig
from deltakit.methods.oft import OFTConfig
from deltakit.methods.sparse_mask import (SaraConfig, SparseGradConfig, SparseRandomConfig, calibrate,
                                          sara_nuclear_loss)
from deltakit.methods.ssf import SSFConfig
from tests.conftest import make_input, make_model, run


def stored(adapter, tmp_path) -> int:
    """Total numel of the tensors in the saved adapter file."""
    dk.save_adapter(adapter, tmp_path / "ad")
    with safe_open(str(tmp_path / "ad" / "adapter.safetensors"), "pt") as f:
        return sum(f.get_tensor(k).numel() for k in f.keys())


def counts(adapter, tmp_path) -> tuple[int, int]:
    return adapter.num_parameters(trainable_only=True), stored(adapter, tmp_path)


def seq(*mods: nn.Module) -> nn.Sequential:
    return nn.Sequential(*mods)


class Chain(nn.Module):
    """Like nn.Sequential, but its forward ignores the ``deltakit_shared`` child an adapter
    with shared parameters registers on the model (Sequential would call it)."""

    def __init__(self, *mods: nn.Module):
        super().__init__()
        for i, mod in enumerate(mods):
            self.add_module(str(i), mod)
        self.n = len(mods)

    def __getitem__(self, i: int) -> nn.Module:
        return getattr(self, str(i))

    def forward(self, x):
        for i in range(self.n):
            x = self[i](x)
        return x


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


def set_(param: torch.Tensor, value) -> None:
    with torch.no_grad():
        param.copy_(torch.as_tensor(value, dtype=param.dtype))


# ------------------------------------------------------------------ IA3
def test_ia3_counts_follow_paper_formula(tmp_path):
    # GPT-2: l_k,l_v live in the fused c_attn (3 d_model, scaled whole) and l_ff (d_ff) on mlp.c_proj's input
    model = make_model("gpt2")
    L, d_model, d_ff = 2, 16, 64
    ad = dk.attach(model, IA3Config())
    assert counts(ad, tmp_path) == (L * (3 * d_model + d_ff),) * 2
    # BERT / Llama: l_k (d_k), l_v (d_v), l_ff (d_ff) per block
    bert = make_model("bert")
    ad = dk.attach(bert, IA3Config())
    L, d_k, d_v, d_ff = 2, 16, 16, 32
    assert ad.num_parameters(trainable_only=True) == L * (d_k + d_v + d_ff)
    llama = make_model("llama")
    ad = dk.attach(llama, IA3Config())
    L, d_kv, d_ff = 2, 8, 32     # one KV head of 8 dims
    assert ad.num_parameters(trainable_only=True) == L * (2 * d_kv + d_ff)


def test_ia3_init_is_base_and_hand_numbers():
    m = seq(nn.Linear(3, 2))
    set_(m[0].weight, [[1.0, 2.0, 3.0], [4.0, 5.0, 6.0]])
    set_(m[0].bias, [1.0, -1.0])
    x = torch.tensor([[1.0, 0.0, 2.0]])                   # W x + b = [8, 15]
    ad = dk.attach(m, IA3Config(targets=["0"]))
    torch.testing.assert_close(m(x), torch.tensor([[8.0, 15.0]]), rtol=0, atol=0)   # l = 1
    set_(ad.model[0].deltas["default"].ia3_l, [2.0, 0.5])
    torch.testing.assert_close(m(x), torch.tensor([[16.0, 7.5]]))   # l ⊙ (W x + b)
    dk.detach(m, "default")
    ad = dk.attach(m, IA3Config(targets=["0"], feedforward=("0",)))
    set_(ad.model[0].deltas["default"].ia3_l, [1.0, 10.0, 0.5])      # W (l ⊙ x) + b, x*l = [1, 0, 1]
    torch.testing.assert_close(m(x), torch.tensor([[1 + 3 + 1.0, 4 + 6 - 1.0]]))
    ad.merge()
    torch.testing.assert_close(m[0].weight, torch.tensor([[1.0, 20.0, 1.5], [4.0, 50.0, 3.0]]))
    torch.testing.assert_close(m[0].bias, torch.tensor([1.0, -1.0]))   # input scaling keeps b


def test_ia3_matches_peft_on_gpt2():
    pytest.importorskip("peft")
    from peft import IA3Config as PeftIA3Config, get_peft_model

    ref_base, ours = make_model("gpt2"), make_model("gpt2")
    ref = get_peft_model(ref_base, PeftIA3Config(target_modules=["c_attn", "mlp.c_proj"],
                                                 feedforward_modules=["mlp.c_proj"], fan_in_fan_out=True))
    ad = dk.attach(ours, IA3Config())
    g = torch.Generator().manual_seed(0)
    for path, d in ad.deltas():
        l = 1 + 0.3 * torch.randn(d.ia3_l.shape, generator=g)
        set_(d.ia3_l, l)
        theirs = ref.base_model.model.get_submodule(path).ia3_l["default"]   # (out, 1) or (1, in)
        set_(theirs, l.reshape(theirs.shape))
    x = make_input("gpt2")
    torch.testing.assert_close(run(ours, x), run(ref, x), atol=1e-5, rtol=1e-5)


# ------------------------------------------------------------------ SSF
def test_ssf_counts_and_bias_free_targets(tmp_path):
    m = seq(nn.Linear(4, 3), nn.Linear(3, 2, bias=False), nn.LayerNorm(2))
    ad = dk.attach(m, SSFConfig(targets=["0", "1", "2"]))
    # gamma, beta per output channel; a bias-free target learns gamma only
    assert counts(ad, tmp_path) == (2 * 3 + 2 + 2 * 2,) * 2
    dk.detach(m, "default")
    with pytest.raises(dk.ConfigError, match="no bias"):
        dk.attach(m, SSFConfig(targets=["1"], bias_free="error"))
    llama = make_model("llama")   # 7 projections + 2 norms per block + final norm, all bias-free
    ad = dk.attach(llama, SSFConfig())
    L, d, d_kv, d_ff = 2, 16, 8, 32
    assert ad.num_parameters(trainable_only=True) == L * (d + 2 * d_kv + d + 2 * d_ff + d + 2 * d) + d


def test_ssf_folded_equals_unfolded_by_hand():
    m = seq(nn.Linear(3, 2))
    x = torch.randn(4, 3)
    y0 = m(x).detach()
    ad = dk.attach(m, SSFConfig(targets=["0"]))
    torch.testing.assert_close(m(x), y0, rtol=0, atol=0)          # gamma = 1, beta = 0
    d = ad.model[0].deltas["default"]
    gamma, beta = torch.tensor([2.0, -0.5]), torch.tensor([0.25, 3.0])
    set_(d.ssf_scale, gamma)
    set_(d.ssf_shift, beta)
    W, b = m[0].base.weight.detach().clone(), m[0].base.bias.detach().clone()
    torch.testing.assert_close(m(x), gamma * y0 + beta)          # unfolded: gamma ⊙ (W x + b) + beta
    ad.merge()
    torch.testing.assert_close(m[0].weight, gamma[:, None] * W)   # W' = diag(gamma) W
    torch.testing.assert_close(m[0].bias, gamma * b + beta)       # b' = gamma ⊙ b + beta
    torch.testing.assert_close(m(x), gamma * y0 + beta)
    torch.manual_seed(1)
    dk.detach(m, "default")
    ad = dk.attach(m, SSFConfig(targets=["0"], init="normal"))
    s = ad.model[0].deltas["default"].ssf_scale
    assert not torch.equal(s, torch.ones(2)) and (s - 1).abs().max() < 0.2


# ------------------------------------------------------------------ BitFit
def test_bitfit_counts_every_bias(tmp_path):
    bert = make_model("bert")
    ad = dk.attach(bert, BitFitConfig())
    L, d, d_ff, C = 2, 16, 32, 3
    # per block: q, k, v, attn-out (d each), intermediate (d_ff), out (d), 2 LayerNorm betas;
    # + embedding LayerNorm, pooler, classifier
    expect = L * (4 * d + d_ff + d + 2 * d) + d + d + C
    assert counts(ad, tmp_path) == (expect, expect)
    with pytest.raises(dk.TargetError, match="bitfit.* can attach to none"):
        dk.attach(make_model("llama"), BitFitConfig())      # Llama has no bias anywhere


def test_bitfit_init_and_hand_numbers():
    m = seq(nn.Linear(2, 2))
    x = torch.tensor([[1.0, 2.0]])
    y0 = m(x).detach()
    ad = dk.attach(m, BitFitConfig(targets=["0"]))
    torch.testing.assert_close(m(x), y0, rtol=0, atol=0)
    set_(ad.model[0].deltas["default"].bias, [0.5, -2.0])
    torch.testing.assert_close(m(x), y0 + torch.tensor([[0.5, -2.0]]))
    ad.merge()
    assert torch.equal(m[0].weight, m[0].base_params()["weight"])


# ------------------------------------------------------------------ LayerNorm tuning
def test_ln_tuning_counts(tmp_path):
    llama = make_model("llama")     # RMSNorm: weight only; 2 per block + final
    ad = dk.attach(llama, LNTuningConfig())
    L, d = 2, 16
    assert counts(ad, tmp_path) == ((2 * L + 1) * d,) * 2
    bert = make_model("bert")       # LayerNorm: weight + bias; embeddings + 2 per block
    assert dk.attach(bert, LNTuningConfig()).num_parameters(trainable_only=True) == (2 * L + 1) * 2 * d


def test_ln_tuning_hand_numbers():
    m = seq(nn.LayerNorm(2))
    x = torch.tensor([[1.0, 3.0]])                  # normalised: [-1, 1] (eps aside)
    ad = dk.attach(m, LNTuningConfig(targets=["0"]))
    torch.testing.assert_close(m(x), torch.tensor([[-1.0, 1.0]]), atol=1e-4, rtol=0)
    d = ad.model[0].deltas["default"].ln_delta
    set_(d["weight"], [1.0, 2.0])                   # gamma' = [2, 3]
    set_(d["bias"], [0.5, 0.0])
    torch.testing.assert_close(m(x), torch.tensor([[-2.0 + 0.5, 3.0]]), atol=1e-3, rtol=0)


# ------------------------------------------------------------------ ETHER
def test_ether_counts(tmp_path):
    m = seq(nn.Linear(8, 6))
    ad = dk.attach(m, EtherConfig(nb=2, targets=["0"]))
    d_in, d_out = 8, 6
    assert counts(ad, tmp_path) == (d_in, d_in)        # nb blocks of d_in/nb: one u each
    dk.detach(m, "default")
    ad = dk.attach(m, EtherConfig(variant="plus", nb=2, targets=["0"]))   # two-sided by default
    assert ad.num_parameters() == 2 * d_in + 2 * d_out  # u, v on each side
    dk.detach(m, "default")
    with pytest.raises(dk.ConfigError, match="multiple of nb=3"):
        dk.attach(m, EtherConfig(nb=3, targets=["0"]))


def test_ether_reflection_by_hand_and_norms():
    m = seq(nn.Linear(2, 2, bias=False))
    W = m[0].weight.detach().clone()
    ad = dk.attach(m, EtherConfig(targets=["0"]))
    set_(ad.model[0].deltas["default"].ether_u, [[1.0, 0.0]])     # H = diag(-1, 1)
    ad.merge()
    torch.testing.assert_close(m[0].weight, W * torch.tensor([-1.0, 1.0]))
    dk.detach(m, "default")
    # random u: H orthogonal, ||H - I||_F = 2 per block, neuron (row) norms unchanged
    torch.manual_seed(0)
    big = seq(nn.Linear(8, 5))
    ad = dk.attach(big, EtherConfig(nb=2, targets=["0"]))
    H = householder(ad.model[0].deltas["default"].ether_u.detach())
    torch.testing.assert_close(H @ H.transpose(1, 2), torch.eye(4).expand(2, 4, 4), atol=1e-6, rtol=0)
    torch.testing.assert_close((H - torch.eye(4)).flatten(1).norm(dim=1), torch.full((2,), 2.0))
    W0 = big[0].weight.detach().clone()
    ad.merge()
    assert not torch.allclose(big[0].weight, W0)
    torch.testing.assert_close(big[0].weight.norm(dim=1), W0.norm(dim=1))


def test_ether_plus_starts_at_base():
    m = seq(nn.Linear(4, 4))
    x = torch.randn(3, 4)
    y0 = m(x).detach()
    dk.attach(m, EtherConfig(variant="plus", nb=2, targets=["0"]))
    torch.testing.assert_close(m(x), y0, atol=1e-6, rtol=0)


# ------------------------------------------------------------------ OFT
def test_oft_counts_and_init(tmp_path):
    m = seq(nn.Linear(8, 4))
    x = torch.randn(3, 8)
    y0 = m(x).detach()
    ad = dk.attach(m, OFTConfig(block_size=4, targets=["0"]))
    r, b = 8 // 4, 4
    assert counts(ad, tmp_path) == (r * b * (b - 1) // 2,) * 2
    torch.testing.assert_close(m(x), y0, rtol=0, atol=1e-6)      # S = 0 => R = I
    dk.detach(m, "default")
    assert dk.attach(m, OFTConfig(r=4, block_size=0, targets=["0"])).num_parameters() == 4 * 1
    with pytest.raises(dk.ConfigError, match="exactly one"):
        OFTConfig(r=2, block_size=4)


def test_oft_cayley_by_hand_and_orthogonal():
    m = seq(nn.Linear(2, 3, bias=False))
    W = m[0].weight.detach().clone()
    ad = dk.attach(m, OFTConfig(block_size=2, targets=["0"]))
    d = ad.model[0].deltas["default"]
    set_(d.oft_S, [[0.5]])         # S = [[0, .5], [-.5, 0]]: R = [[.6, .8], [-.8, .6]]
    R = torch.tensor([[0.6, 0.8], [-0.8, 0.6]])
    torch.testing.assert_close(d.rotation()[0], R)
    ad.merge()
    torch.testing.assert_close(m[0].weight, W @ R.T)
    dk.detach(m, "default")
    torch.manual_seed(0)
    big = seq(nn.Linear(8, 3))
    ad = dk.attach(big, OFTConfig(block_size=4, targets=["0"]))
    d = ad.model[0].deltas["default"]
    set_(d.oft_S, torch.randn(2, 6))
    R = d.rotation().detach()
    torch.testing.assert_close(R @ R.transpose(1, 2), torch.eye(4).expand(2, 4, 4), atol=1e-5, rtol=0)
    assert torch.allclose(torch.linalg.det(R), torch.ones(2), atol=1e-5)   # Cayley: rotations only


def test_coft_keeps_rotation_near_identity():
    m = seq(nn.Linear(8, 3))
    ad = dk.attach(m, OFTConfig(block_size=4, coft=True, eps=1e-2, targets=["0"]))
    d = ad.model[0].deltas["default"]
    set_(d.oft_S, 10 * torch.ones(2, 6))
    R = d.rotation().detach()
    # ||S|| <= eps / sqrt(r); ||R - I|| = ||2 S (I - S)^-1|| ~ 2 ||S||
    assert (R - torch.eye(4)).flatten(1).norm(dim=1).max() <= 2.1 * 1e-2 / math.sqrt(2)


def test_oft_matches_peft_exact_cayley():
    peft = pytest.importorskip("peft")
    from peft import OFTConfig as PeftOFTConfig, get_peft_model

    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(8, 4))
    ref = get_peft_model(nn.Sequential(nn.Linear(8, 4)), PeftOFTConfig(
        r=0, oft_block_size=4, target_modules=["0"], use_cayley_neumann=False))
    ref.base_model.model[0].base_layer.load_state_dict(net[0].state_dict())
    q = torch.randn(2, 6) * 0.3
    with torch.no_grad():
        ref.base_model.model[0].oft_R["default"].weight.copy_(q)
    ad = dk.attach(net, OFTConfig(block_size=4, targets=["0"]))
    # peft's Cayley is (I - Q)(I + Q)^-1, i.e. ours with S = -Q
    set_(ad.model[0].deltas["default"].oft_S, -q)
    x = torch.randn(5, 8)
    torch.testing.assert_close(net(x), ref(x), atol=1e-5, rtol=1e-5)


# ------------------------------------------------------------------ sparse masks
@pytest.mark.parametrize("cfg", [SparseRandomConfig(density=0.05, targets=["0", "1"]),
                                 SaraConfig(density=0.05, targets=["0", "1"])])
def test_sparse_counts_and_init(cfg, tmp_path):
    m = seq(nn.Linear(10, 10), nn.Linear(10, 20))
    x = torch.randn(2, 10)
    y0 = m(x).detach()
    ad = dk.attach(m, cfg)
    p = 0.05
    k = [round(p * 10 * 10), round(p * 20 * 10)]            # k_t = round(p |W_t|)
    # trainable: the k values; stored: values + their int32 positions
    assert counts(ad, tmp_path) == (sum(k), 2 * sum(k))
    torch.testing.assert_close(m(x), y0, rtol=0, atol=0)     # D = 0


@pytest.mark.parametrize("density", [0.002, 0.05])     # gather/scatter path and matmul path
def test_sparse_fast_path_equals_dense(density):
    from transformers.pytorch_utils import Conv1D

    from deltakit.methods._sparse_common import SparseMaskDelta
    gather = density <= SparseMaskDelta.gather_max_density
    m = seq(nn.Linear(64, 48), Conv1D(40, 48))            # Conv1D(nf=out, nx=in): weight (48, 40)
    ad = dk.attach(m, SparseRandomConfig(density=density, targets=["0", "1"]))
    for _, d in ad.deltas():
        set_(d.values, torch.randn(d.values.shape))
        assert (d.values.numel() <= d.gather_max_density * math.prod(d.shape)) == gather  # the path meant
    x = torch.randn(2, 3, 64)
    for i, d in enumerate(layer.deltas["default"] for layer in m):
        base = m[i].base
        dense = torch.func.functional_call(base, {**dict(base.named_parameters()),
                                                  "weight": base.weight + d.delta({})["weight"]}, (x,))
        torch.testing.assert_close(base(x) + d.residual(base, x), dense, atol=1e-5, rtol=1e-5)
        x = dense


def test_sparse_random_is_seeded_per_target():
    def masks(seed):
        m = seq(nn.Linear(10, 10), nn.Linear(10, 10))
        ad = dk.attach(m, SparseRandomConfig(density=0.2, seed=seed, targets=["0", "1"]))
        return [d.indices.clone() for _, d in ad.deltas()]
    a, b, c = masks(0), masks(0), masks(1)
    assert all(torch.equal(u, v) for u, v in zip(a, b))
    assert not torch.equal(a[0], a[1]) and not torch.equal(a[0], c[0])


def test_sara_picks_smallest_magnitudes_by_hand():
    m = seq(nn.Linear(3, 2, bias=False))
    set_(m[0].weight, [[0.5, -0.01, 3.0], [0.02, -2.0, 0.001]])
    ad = dk.attach(m, SaraConfig(density=0.5, targets=["0"]))        # k = 3 smallest |W|
    d = ad.model[0].deltas["default"]
    assert d.indices.tolist() == [1, 3, 5]                           # -0.01, 0.02, 0.001
    set_(d.values, [1.0, 2.0, 3.0])
    dw = d.delta({})["weight"]
    torch.testing.assert_close(dw, torch.tensor([[0.0, 1.0, 0.0], [2.0, 0.0, 3.0]]))
    # nuclear norm of [[0,1,0],[2,0,3]]: singular values sqrt(13) and 1
    torch.testing.assert_close(sara_nuclear_loss(ad), torch.tensor(math.sqrt(13) + 1.0))
    sara_nuclear_loss(ad).backward()
    assert d.values.grad is not None


def test_sparse_grad_calibrate_by_hand(tmp_path):
    m = seq(nn.Linear(3, 2, bias=False))
    x0 = torch.randn(4, 3)
    y0 = m(x0).detach()
    ad = dk.attach(m, SparseGradConfig(density=0.34, targets=["0"]))   # k = round(0.34 * 6) = 2
    with pytest.raises(dk.DeltaStateError, match="calibrate"):
        m(x0)
    # loss = sum_o c_o y_o  =>  dL/dW[o, i] = c_o * sum_b x[b, i]
    c = torch.tensor([1.0, -3.0])
    batches = [torch.tensor([[1.0, 0.1, 2.0]]), torch.tensor([[1.0, 0.0, -1.0]])]
    scores = calibrate(ad, batches, lambda model, b: (model(b) * c).sum())
    # sum over batches of |c_o x_i|: |x| summed = [2, .1, 3]
    torch.testing.assert_close(scores["0"], torch.tensor([[2.0, 0.1, 3.0], [6.0, 0.3, 9.0]]))
    d = ad.model[0].deltas["default"]
    assert d.indices.tolist() == [3, 5]                      # scores 6 and 9
    assert m[0].base.weight.grad is None and not m[0].base.weight.requires_grad
    torch.testing.assert_close(m(x0), y0, rtol=0, atol=0)
    set_(d.values, [0.5, -0.5])
    y = m(x0).detach()
    ad.merge()
    torch.testing.assert_close(m(x0), y, rtol=1e-6, atol=1e-6)
    ad.unmerge()
    assert counts(ad, tmp_path) == (2, 4)
    torch.manual_seed(0)
    fresh = seq(nn.Linear(3, 2, bias=False))
    dk.load_adapter(fresh, tmp_path / "ad")
    torch.testing.assert_close(fresh(x0), y, rtol=0, atol=0)  # the mask travels in the file


# ------------------------------------------------------------------ HFT
def test_hft_trains_half_of_each_category(tmp_path):
    llama = make_model("llama")
    x = make_input("llama")
    y0 = run(llama, x).detach()
    ad = dk.attach(llama, HFTConfig(seed=3))
    torch.testing.assert_close(run(llama, x), y0, rtol=0, atol=0)      # P = W at init
    sizes = {"q_proj": 16 * 16, "k_proj": 8 * 16, "v_proj": 8 * 16, "o_proj": 16 * 16,
             "gate_proj": 32 * 16, "up_proj": 32 * 16, "down_proj": 16 * 32}
    trained = [p for p, d in ad.deltas() if d.trained]
    for block in (0, 1):
        names = [p.rsplit(".", 1)[1] for p in trained if f"layers.{block}." in p]
        attn = [n for n in names if n.endswith(("q_proj", "k_proj", "v_proj", "o_proj"))]
        assert len(attn) == 4 // 2 and len(names) - len(attn) in (1, 2)   # half of 4, floor/ceil half of 3
    expect = sum(sizes[p.rsplit(".", 1)[1]] for p in trained)   # full copies of the trained half only
    assert counts(ad, tmp_path) == (expect, expect)
    fresh = make_model("llama")
    loaded = dk.load_adapter(fresh, tmp_path / "ad")
    assert sorted(p for p, d in loaded.deltas() if d.trained) == sorted(trained)


# ------------------------------------------------------------------ LISA
def test_lisa_counts_and_schedule(tmp_path):
    m = nn.ModuleDict({"emb": nn.Embedding(5, 2), "layers": nn.ModuleList([nn.Linear(2, 2) for _ in range(4)]),
                       "head": nn.Linear(2, 3)})
    ad = dk.attach(m, LisaConfig(gamma=2, period=3, seed=0, targets=["emb", "head", r"re:layers\.\d+"]))
    emb, head, block, n_blocks, gamma = 5 * 2, 2 * 3 + 3, 2 * 2 + 2, 4, 2
    assert stored(ad, tmp_path) == emb + head + n_blocks * block       # every copy is stored
    sched = LisaSchedule(ad)
    assert ad.num_parameters(trainable_only=True) == emb + head + gamma * block
    first = sched.active
    seen = {first}
    for step in range(1, 13):
        before = sched.active
        sched.on_step(step, m)
        if step % 3:
            assert sched.active == before
        seen.add(sched.active)
        for path, d in ad.deltas():
            on = d.layer is None or d.layer in sched.active
            assert all(p.requires_grad == on for p in d.parameters()), path
    assert len(seen) > 1
    with pytest.raises(dk.ConfigError, match="gamma"):
        m2 = nn.ModuleDict({"layers": nn.ModuleList([nn.Linear(2, 2)])})
        LisaSchedule(dk.attach(m2, LisaConfig(gamma=2, targets=[r"re:layers\.\d+"])))


def test_lisa_training_only_moves_active_blocks():
    layers = nn.ModuleList([nn.Linear(3, 3) for _ in range(4)])
    m = Chain(*layers)
    ad = dk.attach(m, LisaConfig(gamma=1, period=2, seed=1, targets=[str(i) for i in range(4)]))
    sched = LisaSchedule(ad)
    opt = torch.optim.AdamW(list(ad.parameters()), lr=0.1)   # ALL adapter parameters
    x = torch.randn(8, 3)
    for step in range(1, 5):
        active = sched.active
        before = {p: [v.detach().clone() for v in d.parameters()] for p, d in ad.deltas()}
        m(x).pow(2).mean().backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        for path, d in ad.deltas():
            moved = any(not torch.equal(a, b) for a, b in zip(before[path], d.parameters()))
            assert moved == (d.layer in active), (step, path, active)
        sched.on_step(step, m)


def test_lisa_refuses_tied_targets():
    gpt2 = make_model("gpt2")
    with pytest.raises(dk.TargetError, match="tied"):
        dk.attach(gpt2, LisaConfig(targets=["wte", "lm_head"]))


# ------------------------------------------------------------------ intrinsic dimension
def sylvester(n: int) -> torch.Tensor:
    H = torch.ones(1, 1)
    while H.shape[0] < n:
        H = torch.cat([torch.cat([H, H], 1), torch.cat([H, -H], 1)], 0)
    return H


def test_fwht_is_hadamard_and_fastfood_is_a_near_isometry():
    x = torch.randn(3, 8)
    torch.testing.assert_close(fwht(x), x @ sylvester(8), atol=1e-5, rtol=0)
    g = torch.Generator().manual_seed(0)
    L, D, d = 256, 200, 64
    signs = (torch.randint(0, 2, (L,), generator=g) * 2 - 1).float()
    perm, gauss = torch.randperm(L, generator=g), torch.randn(L, generator=g)
    P = torch.stack([fastfood(e, signs, perm, gauss, D) for e in torch.eye(d)], 1)     # (D, d)
    z = torch.randn(d, generator=g)
    torch.testing.assert_close(fastfood(z, signs, perm, gauss, D), P @ z, atol=1e-4, rtol=1e-4)   # linear
    assert abs(P.norm(dim=0).pow(2).mean().item() - 1.0) < 0.1     # columns ~ unit length


@pytest.mark.parametrize("projection", ["dense", "fastfood"])
def test_intrinsic_counts_init_merge_and_reload(projection, tmp_path):
    m = Chain(nn.Linear(6, 5), nn.Linear(5, 4))
    x = torch.randn(3, 6)
    y0 = m(x).detach()
    ad = dk.attach(m, IntrinsicConfig(d=7, projection=projection, targets=["0", "1"]))
    assert counts(ad, tmp_path) == (7, 7)                   # d; P is regenerated, never stored
    torch.testing.assert_close(m(x), y0, rtol=0, atol=0)   # z = 0
    set_(ad.shared.z, torch.randn(7))
    y = m(x).detach()
    assert not torch.allclose(y, y0)
    ad.merge()
    torch.testing.assert_close(m(x), y, rtol=1e-5, atol=1e-5)
    ad.unmerge()
    dk.save_adapter(ad, tmp_path / "ad2")
    torch.manual_seed(0)
    fresh = Chain(nn.Linear(6, 5), nn.Linear(5, 4))
    dk.load_adapter(fresh, tmp_path / "ad2")
    torch.testing.assert_close(fresh(x), y, rtol=0, atol=0)
    dk.detach(m, "default")
    said = dk.attach(m, IntrinsicConfig(d=7, said=True, projection=projection, targets=["0", "1"]))
    m_layers = 2
    assert said.num_parameters() == (7 - m_layers) + m_layers      # z: d - m, lambda: m


def test_intrinsic_dense_projection_columns_unit():
    m = seq(nn.Linear(6, 5))
    ad = dk.attach(m, IntrinsicConfig(d=4, projection="dense", targets=["0"]))
    P = ad.model[0].deltas["default"].P
    assert P.shape == (6 * 5 + 5, 4)
    torch.testing.assert_close(P.norm(dim=0), torch.ones(4))
