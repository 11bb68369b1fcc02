"""VeRA, NOLA, VB-LoRA, MoS (shared random bases and banks); LoHa, LoKr, FLoRA, LoRETTA
(Kronecker and tensor forms).

Per method: (a) trainable / stored counts from the paper's formula against the adapter
and the saved file, (b) the paper's initialisation property, (c) hand-worked numbers.
The tiny BERT has L = 4 targets (query, value in 2 layers), each d_in = d_out = 16.
"""
from __future__ import annotations

import math

import pytest
import torch
from safetensors import safe_open
from torch import nn

import deltakit as dk
from deltakit.core.registry import ConfigError, get_method
from tests.conftest import make_input, make_model, run

L, D = 4, 16  # tiny BERT: targets and their width


def cfg(method: str, **kw):
    return get_method(method).config(**kw)


def stored(adapter, tmp_path) -> tuple[int, list[str]]:
    dk.save_adapter(adapter, tmp_path / "ad")
    with safe_open(str(tmp_path / "ad" / "adapter.safetensors"), "pt") as f:
        keys = list(f.keys())
        return sum(f.get_tensor(k).numel() for k in keys), keys


def bert_adapter(method: str, **kw):
    model = make_model("bert")
    x = make_input("bert")
    y0 = run(model, x).detach()
    return model, x, y0, dk.attach(model, cfg(method, **kw))


def delta_of(layer_module, name="default"):
    return layer_module.deltas[name].delta(layer_module.base_params())["weight"]


def one_linear(method: str, fan_in: int, fan_out: int, **kw):
    m = nn.Sequential(nn.Linear(fan_in, fan_out))
    return m, dk.attach(m, cfg(method, targets=["0"], **kw))


# ------------------------------------------------------------------ VeRA
def test_vera_counts_and_seed_not_stored(tmp_path):
    r = 8
    model, x, y0, ad = bert_adapter("vera", r=r)
    expected = L * (r + D)                      # per layer: d (r) + b (d_out)
    assert ad.num_parameters(trainable_only=True) == expected
    n, keys = stored(ad, tmp_path)
    assert n == expected and not any("vera_A" in k or "vera_B" in k for k in keys)
    # the frozen pair is regenerated from the seed in the config, identically
    fresh = make_model("bert")
    loaded = dk.load_adapter(fresh, tmp_path / "ad")
    assert torch.equal(loaded.shared.vera_A, ad.shared.vera_A)
    other = dk.attach(make_model("bert"), cfg("vera", r=r, seed=1))
    assert not torch.equal(other.shared.vera_A, ad.shared.vera_A)


def test_vera_init_starts_at_base():
    model, x, y0, ad = bert_adapter("vera", r=8, d_initial=0.1)
    torch.testing.assert_close(run(model, x), y0, rtol=0, atol=0)
    for _, d in ad.deltas():
        assert torch.all(d.vera_lambda_b == 0) and torch.all(d.vera_lambda_d == 0.1)


def test_vera_hand_numbers_and_slicing():
    m = nn.Sequential(nn.Linear(3, 2), nn.Linear(2, 3))
    ad = dk.attach(m, cfg("vera", r=2, targets=["0", "1"]))
    sh = ad.shared
    assert tuple(sh.vera_A.shape) == (2, 3) and tuple(sh.vera_B.shape) == (3, 2)   # (r, in_max), (out_max, r)
    with torch.no_grad():
        sh.vera_A.copy_(torch.tensor([[1., 0., 2.], [0., 1., 0.]]))
        sh.vera_B.copy_(torch.tensor([[1., 1.], [0., 2.], [5., 5.]]))
        d0 = m[0].deltas["default"]
        d0.vera_lambda_d.copy_(torch.tensor([2., 3.]))
        d0.vera_lambda_b.copy_(torch.tensor([1., -1.]))
    # diag(d) A = [[2,0,4],[0,3,0]];  B[:2] @ that = [[2,3,4],[0,6,0]];  diag(b) -> flip row 2
    torch.testing.assert_close(delta_of(m[0]), torch.tensor([[2., 3., 4.], [0., -6., 0.]]))
    # the second layer (in=2, out=3) uses the slices A[:, :2] and B[:3, :]
    d1 = m[1].deltas["default"]
    with torch.no_grad():
        d1.vera_lambda_d.fill_(1.0)
        d1.vera_lambda_b.fill_(1.0)
    torch.testing.assert_close(delta_of(m[1]), sh.vera_B @ sh.vera_A[:, :2])


# ------------------------------------------------------------------ NOLA
@pytest.mark.parametrize("r", [2, 8])
def test_nola_counts_independent_of_rank(r, tmp_path):
    k, l = 6, 5
    model, x, y0, ad = bert_adapter("nola", r=r, num_basis_A=k, num_basis_B=l)
    assert ad.num_parameters(trainable_only=True) == L * (k + l)
    n, keys = stored(ad, tmp_path)
    assert n == L * (k + l) and not any("basis" in key for key in keys)
    loaded = dk.load_adapter(make_model("bert"), tmp_path / "ad")
    (_, d_old), (_, d_new) = next(ad.deltas()), next(loaded.deltas())
    assert torch.equal(d_old.basis_A, d_new.basis_A)     # regenerated from (seed, path)


def test_nola_init_beta_zero_starts_at_base():
    model, x, y0, ad = bert_adapter("nola", r=4, num_basis_A=4, num_basis_B=4)
    torch.testing.assert_close(run(model, x), y0, rtol=0, atol=0)
    for _, d in ad.deltas():
        assert torch.all(d.nola_beta == 0) and d.nola_alpha.abs().max() <= 1 / math.sqrt(4)


def test_nola_one_basis_coefficient_one_is_that_basis_product():
    m, ad = one_linear("nola", 5, 3, r=2, num_basis_A=1, num_basis_B=1, lora_alpha=2.0)
    d = m[0].deltas["default"]
    with torch.no_grad():
        d.nola_alpha.fill_(1.0)
        d.nola_beta.fill_(1.0)
    torch.testing.assert_close(delta_of(m[0]), (2.0 / 2) * d.basis_B[0] @ d.basis_A[0])


def test_nola_on_the_fly_bases_match_buffers():
    torch.manual_seed(0)
    x = torch.randn(3, 7)
    outs, grads = [], []
    for in_memory in (True, False):
        torch.manual_seed(1)     # same base Linear both times
        m, ad = one_linear("nola", 7, 5, r=3, num_basis_A=70, num_basis_B=9, basis_in_memory=in_memory)
        d = m[0].deltas["default"]
        assert hasattr(d, "basis_A") == in_memory
        with torch.no_grad():
            d.nola_alpha.copy_(torch.linspace(-1, 1, 70))
            d.nola_beta.copy_(torch.linspace(1, 2, 9))
        y = m(x)
        y.pow(2).sum().backward()
        outs.append(y.detach())
        grads.append((d.nola_alpha.grad.clone(), d.nola_beta.grad.clone()))
    torch.testing.assert_close(outs[0], outs[1])
    torch.testing.assert_close(grads[0], grads[1], rtol=1e-5, atol=1e-5)   # summation order differs


def test_nola_hand_numbers():
    m, ad = one_linear("nola", 2, 2, r=1, num_basis_A=2, num_basis_B=1, lora_alpha=1.0)
    d = m[0].deltas["default"]
    with torch.no_grad():
        d.basis_A.copy_(torch.tensor([[[1., 0.]], [[0., 1.]]]))   # A_1 = [1 0], A_2 = [0 1]
        d.basis_B.copy_(torch.tensor([[[1.], [2.]]]))             # B_1 = [1 2]^T
        d.nola_alpha.copy_(torch.tensor([3., -1.]))               # A = [3 -1]
        d.nola_beta.copy_(torch.tensor([0.5]))                    # B = [0.5 1]^T
    torch.testing.assert_close(delta_of(m[0]), torch.tensor([[1.5, -0.5], [3., -1.]]))


# ------------------------------------------------------------------ VB-LoRA
def test_vblora_counts_topk_storage(tmp_path):
    r, h, b, k = 2, 8, 4, 2
    model, x, y0, ad = bert_adapter("vb_lora", r=r, num_vectors=h, vector_length=b, topk=k)
    n_sub = L * (r * D // b + (D // b) * r)          # sub-vectors of A (r, in) and B (out, r)
    assert ad.num_parameters(trainable_only=True) == h * b + n_sub * h     # bank + logits
    n, keys = stored(ad, tmp_path)
    assert n == h * b + n_sub * 2 * k                 # bank + top-k (indices, logits) per sub-vector
    assert sum("vector_bank" in key for key in keys) == 1                 # stored once
    # exact reload although only top-k survive
    with torch.no_grad():
        for p in ad.parameters():
            p.add_(0.3 * torch.randn_like(p))
    y = run(model, x).detach()
    dk.save_adapter(ad, tmp_path / "ad2")
    fresh = make_model("bert")
    dk.load_adapter(fresh, tmp_path / "ad2")
    torch.testing.assert_close(run(fresh, x).detach(), y, rtol=0, atol=0)


def test_vblora_full_logit_storage(tmp_path):
    model, x, y0, ad = bert_adapter("vb_lora", r=2, num_vectors=8, vector_length=4, save_only_topk=False)
    n, _ = stored(ad, tmp_path)
    assert n == ad.num_parameters()


def test_vblora_hand_admixture_and_topk_gradient():
    from deltakit.methods.vb_lora import topk_admixture
    bank = torch.tensor([[1., 0.], [0., 1.], [2., 2.]], requires_grad=True)
    logits = torch.tensor([[1.0, 1.0 + math.log(3.0), -5.0]], requires_grad=True)
    v = topk_admixture(logits, bank, 2)
    # top-2 = vectors 1 and 0 with softmax weights 3/4, 1/4
    torch.testing.assert_close(v, torch.tensor([[0.25, 0.75]]))
    v[0, 0].backward()    # (both selected vectors sum to 1, so v.sum() would be flat)
    assert logits.grad[0, 2] == 0 and torch.all(bank.grad[2] == 0)   # unselected: no gradient
    assert logits.grad[0, :2].abs().sum() > 0


def test_vblora_init_and_composition():
    m, ad = one_linear("vb_lora", 8, 4, r=2, num_vectors=6, vector_length=4, topk=2,
                       init_bank_bound=0.02, init_logits_std=0.1)
    bank = ad.shared.vector_bank
    assert bank.abs().max() <= 0.02
    d = m[0].deltas["default"]
    A, B = d.low_rank()
    # row 1, second sub-vector of A, rebuilt by hand from its logits
    z = d.vblora_logits_A[1, 1]
    vals, idx = z.topk(2)
    w = torch.softmax(vals, 0)
    torch.testing.assert_close(A[1, 4:8], w[0] * bank[idx[0]] + w[1] * bank[idx[1]])
    with pytest.raises(ConfigError, match="vector_length"):
        one_linear("vb_lora", 6, 4, vector_length=4)


# ------------------------------------------------------------------ MoS
def test_mos_counts_pools_and_indices_not_stored(tmp_path):
    r, e, p, l = 4, 2, 1, 2
    model, x, y0, ad = bert_adapter("mos", r=r, equivalent_rank=e, private_rank=p, shards_per_vector=l)
    assert ad.num_parameters(trainable_only=True) == L * e * (D + D)      # a rank-e LoRA's count
    n, keys = stored(ad, tmp_path)
    assert n == L * e * (D + D) and not any("index" in key for key in keys)
    pools = ad.shared.pools
    assert tuple(pools["A_8"].shape) == (L * (e - p) * l, D // l)        # public shards of all targets
    loaded = dk.load_adapter(make_model("bert"), tmp_path / "ad")
    (_, d_old), (_, d_new) = next(ad.deltas()), next(loaded.deltas())
    assert torch.equal(d_old.index_A, d_new.index_A)                      # regenerated from the seed


def test_mos_init_and_sharing():
    model, x, y0, ad = bert_adapter("mos", r=4, equivalent_rank=2, private_rank=1, shards_per_vector=2)
    torch.testing.assert_close(run(model, x), y0, rtol=0, atol=0)        # B shards start at zero
    deltas = [d for _, d in ad.deltas()]
    # subset selection: a target uses (r - p) * l public shards, each from the shared pool;
    # pair dissociation: A and B draw indices independently
    assert all(d.index_A.numel() == 3 * 2 for d in deltas)
    assert any(not torch.equal(d.index_A, d.index_B) for d in deltas)
    assert any(not torch.equal(deltas[0].index_A, d.index_A) for d in deltas[1:])
    # inter-layer sharing: one pool shard shows up in every target that selected it
    shard = int(deltas[0].index_A[0])
    users = [d for d in deltas if shard in d.index_A.tolist()]
    with torch.no_grad():
        ad.shared.pools["A_8"][shard].fill_(7.0)
    for d in users:
        A, _ = d.low_rank()
        assert (A == 7.0).any()


def test_mos_hand_numbers():
    m, ad = one_linear("mos", 4, 4, r=2, equivalent_rank=2, private_rank=1, shards_per_vector=2, alpha=2.0)
    d = m[0].deltas["default"]
    with torch.no_grad():
        d.mos_private_A.copy_(torch.tensor([[1., 2.], [3., 4.]]))
        ad.shared.pools["A_2"].copy_(torch.tensor([[5., 6.], [7., 8.]]))
        d.mos_private_B.copy_(torch.tensor([[1., 0.], [0., 1.]]))
        ad.shared.pools["B_2"].copy_(torch.tensor([[2., 0.], [0., 2.]]))
    ia, ib = d.index_A.tolist(), d.index_B.tolist()
    pa = {0: [5., 6.], 1: [7., 8.]}
    pb = {0: [2., 0.], 1: [0., 2.]}
    A = torch.tensor([[1., 2., 3., 4.], pa[ia[0]] + pa[ia[1]]])          # row = concatenated shards
    B = torch.tensor([[1., 0., 0., 1.], pb[ib[0]] + pb[ib[1]]]).t()      # column = concatenated shards
    torch.testing.assert_close(delta_of(m[0]), (2.0 / 2) * B @ A)


# ------------------------------------------------------------------ LoHa
def test_loha_counts(tmp_path):
    r = 2
    model, x, y0, ad = bert_adapter("loha", r=r)
    assert ad.num_parameters(trainable_only=True) == L * 2 * r * (D + D)
    assert stored(ad, tmp_path)[0] == L * 2 * r * (D + D)
    conv = make_model("conv")
    ad = dk.attach(conv, cfg("loha", r=r, targets=["conv2"]))             # (8, 8, 3, 3), flattened
    assert ad.num_parameters() == 2 * r * (8 + 8 * 3 * 3)


def test_loha_init_and_hand_numbers():
    model, x, y0, ad = bert_adapter("loha", r=2)
    torch.testing.assert_close(run(model, x), y0, rtol=0, atol=0)
    m, ad = one_linear("loha", 2, 2, r=1, alpha=1.0)
    d = m[0].deltas["default"]
    with torch.no_grad():
        d.hada_w1_a.copy_(torch.tensor([[1.], [2.]]))
        d.hada_w1_b.copy_(torch.tensor([[1., 0.]]))
        d.hada_w2_a.copy_(torch.tensor([[3.], [1.]]))
        d.hada_w2_b.copy_(torch.tensor([[2., 1.]]))
    # [[1,0],[2,0]] * [[6,3],[2,1]]
    torch.testing.assert_close(delta_of(m[0]), torch.tensor([[6., 0.], [4., 0.]]))


# ------------------------------------------------------------------ LoKr
def test_lokr_factorization_matches_lycoris_rule():
    from deltakit.methods.lokr import factorization
    assert factorization(4096) == (64, 64)
    assert factorization(4096, 8) == (8, 512)
    assert factorization(768) == (24, 32)
    assert factorization(12, 5) == (3, 4)    # 5 does not divide 12: most balanced with m <= 5
    assert factorization(12, 2) == (2, 6)
    assert factorization(7) == (1, 7)


def test_lokr_counts(tmp_path):
    r = 1
    model, x, y0, ad = bert_adapter("lokr", r=r)
    # 16 = 4 * 4 both ways: w1 (4, 4) full; w2 low rank since r < 4 / 2: (4, r) + (r, 4)
    per = 4 * 4 + r * (4 + 4)
    assert ad.num_parameters(trainable_only=True) == L * per
    assert stored(ad, tmp_path)[0] == L * per
    conv = make_model("conv")
    ad = dk.attach(conv, cfg("lokr", r=8, targets=["conv2"]))               # 8 = 2*4: w1 (2, 2), w2 (4, 4, 3, 3)
    assert ad.num_parameters() == 2 * 2 + 4 * 4 * 3 * 3
    model, x, y0, ad = bert_adapter("lokr", r=r, full_matrix=True)           # both factors full: 2 * (4 * 4)
    assert ad.num_parameters() == L * (4 * 4 + 4 * 4)
    model, x, y0, ad = bert_adapter("lokr", r=r, decompose_both=True, factor=2)  # 16 = 2*8: w1 (2,2) stays full
    assert ad.num_parameters() == L * (2 * 2 + r * (8 + 8))


def test_lokr_init_and_hand_numbers():
    model, x, y0, ad = bert_adapter("lokr", r=1)
    torch.testing.assert_close(run(model, x), y0, rtol=0, atol=0)
    m, ad = one_linear("lokr", 4, 2, r=8)    # out 2 = 1*2, in 4 = 2*2; w2 full -> scale 1
    d = m[0].deltas["default"]
    with torch.no_grad():
        d.lokr_w1.copy_(torch.tensor([[1., 2.]]))
        d.lokr_w2.copy_(torch.tensor([[0., 1.], [1., 0.]]))
    torch.testing.assert_close(delta_of(m[0]), torch.tensor([[0., 1., 0., 2.], [1., 0., 2., 0.]]))


# ------------------------------------------------------------------ FLoRA
def test_flora_counts(tmp_path):
    r = 2
    model, x, y0, ad = bert_adapter("flora", r=r)
    assert ad.num_parameters(trainable_only=True) == L * (r * r + r * (D + D))
    assert stored(ad, tmp_path)[0] == L * (r * r + r * (D + D))
    conv = make_model("conv")
    ad = dk.attach(conv, cfg("flora", r=r, r_kernel=2, targets=["conv2"]))  # (8, 8, 3, 3)
    assert ad.num_parameters() == r * r * 2 * 2 + r * (8 + 8) + 2 * (3 + 3)
    (_, d), = ad.deltas()
    assert tuple(d.flora_G.shape) == (r, r, 2, 2)                             # the core stays 4-D


def test_flora_init_and_hand_numbers():
    model, x, y0, ad = bert_adapter("flora", r=2)
    torch.testing.assert_close(run(model, x), y0, rtol=0, atol=0)            # G = 0
    m, ad = one_linear("flora", 3, 2, r=1, scale=1.0)
    d = m[0].deltas["default"]
    with torch.no_grad():
        d.flora_U_out.copy_(torch.tensor([[1.], [2.]]))
        d.flora_G.fill_(3.0)
        d.flora_U_in.copy_(torch.tensor([[1.], [0.], [1.]]))
    torch.testing.assert_close(delta_of(m[0]), torch.tensor([[3., 0., 3.], [6., 0., 6.]]))
    # Conv2d, all Tucker ranks 1: dW[o, i, h, w] = G * U_out[o] * U_in[i] * U_kh[h] * U_kw[w]
    conv = nn.Sequential(nn.Conv2d(2, 2, (2, 3)))
    dk.attach(conv, cfg("flora", r=1, r_kernel=1, scale=0.5, targets=["0"]))
    d = conv[0].deltas["default"]
    with torch.no_grad():
        d.flora_G.fill_(2.0)
        d.flora_U_out.copy_(torch.tensor([[1.], [3.]]))
        d.flora_U_in.copy_(torch.tensor([[2.], [1.]]))
        d.flora_U_kh.copy_(torch.tensor([[1.], [-1.]]))
        d.flora_U_kw.copy_(torch.tensor([[1.], [0.], [2.]]))
    dw = delta_of(conv[0])
    assert dw.shape == (2, 2, 2, 3)
    assert dw[1, 0, 1, 2].item() == 0.5 * 2 * 3 * 2 * -1 * 2     # -12
    assert dw[0, 1, 0, 0].item() == 0.5 * 2 * 1 * 1 * 1 * 1      # 1
    assert dw[0, 0, 0, 1].item() == 0.0


# ------------------------------------------------------------------ LoRETTA
def test_loretta_counts_and_reshaping(tmp_path):
    from deltakit.methods.loretta import tt_modes
    assert tt_modes(768, 12) == [12, 8, 8] and tt_modes(16, 4) == [4, 4]
    r, t = 4, 2
    model, x, y0, ad = bert_adapter("loretta", r=r, tt_rank=t, max_mode=4)
    # A: (16, 4) -> modes (4, 4 | 4), B: (4, 16) -> modes (4 | 4, 4); cores (1,4,t), (t,4,t), (t,4,1)
    per_train = 1 * 4 * t + t * 4 * t + t * 4 * 1
    assert ad.num_parameters(trainable_only=True) == L * 2 * per_train
    assert stored(ad, tmp_path)[0] == L * 2 * per_train


def test_loretta_init():
    model, x, y0, ad = bert_adapter("loretta", r=4, tt_rank=2, max_mode=4, init="zero")
    torch.testing.assert_close(run(model, x), y0, rtol=0, atol=0)
    model, x, y0, ad = bert_adapter("loretta", r=4, tt_rank=2, max_mode=4)       # reference: Gaussian
    assert not torch.allclose(run(model, x), y0)
    # reference code: core k ~ N(0, 1) / sqrt(r_k) * target_std ** (1/K), target_std = sqrt(1 / (in + r))
    torch.manual_seed(0)
    m, ad = one_linear("loretta", 512, 512, r=8, tt_rank=8, max_mode=8)
    d = m[0].deltas["default"]
    K = len(d.cores_A)
    assert d.modes_A == [8, 8, 8, 8]                      # 512 -> 8 8 8, r = 8 -> 8
    target = math.sqrt(1 / (512 + 8)) ** (1 / K)
    for c in d.cores_A:
        expected = target / math.sqrt(c.shape[2])
        assert abs(c.std().item() / expected - 1) < 0.25, (c.shape, c.std().item(), expected)


def test_loretta_hand_numbers():
    from deltakit.methods.loretta import tt_full
    g1 = torch.tensor([[[1., 0.], [0., 1.]]])          # (1, 2, 2)
    g2 = torch.tensor([[[2.], [3.]], [[4.], [5.]]])    # (2, 2, 1)
    # full[i, j] = sum_a g1[0, i, a] g2[a, j, 0]
    torch.testing.assert_close(tt_full([g1, g2]), torch.tensor([[2., 3.], [4., 5.]]))
    m, ad = one_linear("loretta", 2, 2, r=1, tt_rank=2, max_mode=2, alpha=1.0)
    d = m[0].deltas["default"]
    assert d.modes_A == [2, 1] and d.modes_B == [1, 2]
    A, B = d.low_rank()
    torch.testing.assert_close(delta_of(m[0]), B @ A)


# ------------------------------------------------------------------ parity with peft (reference peer)
def _peft_pair(peft_cfg, ours_cfg, fan_in=16, fan_out=12, module=None):
    """The same Linear (or ``module``) adapted by peft and by us, with peft's (perturbed)
    values copied into ours."""
    import copy

    peft = pytest.importorskip("peft")
    torch.manual_seed(0)
    ours = nn.Sequential(module if module is not None else nn.Linear(fan_in, fan_out))
    ref = peft.get_peft_model(copy.deepcopy(ours), peft_cfg).base_model.model
    ad = dk.attach(ours, ours_cfg)
    d = ours[0].deltas["default"]
    with torch.no_grad():
        for name, p in ref.named_parameters():
            if p.requires_grad:
                p.add_(0.3 * torch.randn_like(p))
                key = name.split(".")[-2]
                dst = ad.shared.vector_bank if key == "vblora_vector_bank" else getattr(d, key)
                dst.copy_(p)
    return ref[0], ours[0], ad


def _assert_same_delta(ref_layer, our_layer):
    torch.testing.assert_close(delta_of(our_layer), ref_layer.get_delta_weight("default"), rtol=1e-5, atol=1e-6)
    conv = isinstance(our_layer.base, nn.Conv2d)
    x = torch.randn(2, our_layer.base.in_channels, 6, 6) if conv else torch.randn(3, our_layer.base.in_features)
    torch.testing.assert_close(our_layer(x), ref_layer(x), rtol=1e-5, atol=1e-6)


def test_loha_parity_with_peft():
    from peft import LoHaConfig
    ref, ours, _ = _peft_pair(LoHaConfig(r=2, alpha=3, target_modules=["0"]), cfg("loha", r=2, alpha=3, targets=["0"]))
    _assert_same_delta(ref, ours)


@pytest.mark.parametrize("decompose_both", [False, True])
def test_lokr_parity_with_peft(decompose_both):
    from peft import LoKrConfig
    kw = dict(r=1, alpha=3)
    ref, ours, _ = _peft_pair(LoKrConfig(target_modules=["0"], decompose_both=decompose_both, **kw),
                              cfg("lokr", targets=["0"], decompose_both=decompose_both, **kw), 64, 36)
    _assert_same_delta(ref, ours)


def test_vera_parity_with_peft():
    from peft import VeraConfig
    ref, ours, ad = _peft_pair(VeraConfig(r=8, target_modules=["0"], projection_prng_key=3),
                               cfg("vera", r=8, seed=3, targets=["0"]))
    assert torch.equal(ad.shared.vera_A, ref.vera_A["default"])       # same seeded draw
    assert torch.equal(ad.shared.vera_B, ref.vera_B["default"])
    _assert_same_delta(ref, ours)


def test_vblora_parity_with_peft():
    from peft import VBLoRAConfig
    kw = dict(r=2, num_vectors=6, vector_length=4, topk=2)
    ref, ours, _ = _peft_pair(VBLoRAConfig(target_modules=["0"], **kw), cfg("vb_lora", targets=["0"], **kw))
    _assert_same_delta(ref, ours)


@pytest.mark.parametrize("method,r", [("loha", 2), ("lokr", 1), ("lokr", 8)])
def test_conv2d_parity_with_peft(method, r):
    from peft import LoHaConfig, LoKrConfig
    peft_cls = {"loha": LoHaConfig, "lokr": LoKrConfig}[method]
    ref, ours, _ = _peft_pair(peft_cls(r=r, alpha=r, target_modules=["0"]), cfg(method, r=r, alpha=r, targets=["0"]),
                              module=nn.Conv2d(8, 12, 3, padding=1))
    _assert_same_delta(ref, ours)


@pytest.mark.parametrize("method,kw,kind", [("vera", dict(r=8), "gpt2"), ("mos", dict(r=4), "gpt2"),
                                           ("loretta", dict(r=4, max_mode=4), "gpt2"),
                                           ("flora", dict(r=2), "gpt2"), ("flora", dict(r=2), "bert"),
                                           ("flora", dict(r=2, targets=["conv1", "conv2"]), "conv")])
def test_factored_methods_stay_low_rank_in_task_vectors(method, kw, kind):
    from deltakit.taskvec import LowRank, as_dense
    model = make_model(kind)                                     # gpt2 Conv1D: weight stored (in, out)
    ad = dk.attach(model, cfg(method, **kw))
    with torch.no_grad():
        for p in ad.parameters():
            p.add_(0.1 * torch.randn_like(p))
    tv = dk.TaskVector.from_adapter(ad)
    for key, dw in ad.delta_weights():
        assert isinstance(tv.get(key), LowRank)
        torch.testing.assert_close(as_dense(tv.get(key)), dw, rtol=1e-5, atol=1e-6)
