"""LoRA variants and rank budgets: DoRA, PiSSA, Tied-LoRA, LoRA-FA, AdaLoRA, IncreLoRA.

Per method: parameter counts from the paper's formula (trainable and stored), the
paper's initialisation property, and hand-checked numbers on tiny tensors.
"""
from __future__ import annotations

import math

import pytest
import torch
from safetensors import safe_open
from torch import nn

import deltakit as dk
from deltakit.methods._lora_common import Sensitivity, seeded_init
from deltakit.methods.adalora import AdaLoraConfig, AdaLoRABudget, regularizer
from deltakit.methods.dora import DoraConfig
from deltakit.methods.increlora import IncreLoraConfig, IncreLoRABudget
from deltakit.methods.lora_fa import LoraFAConfig
from deltakit.methods.pissa import PissaConfig
from deltakit.methods.tied_lora import TiedLoraConfig
from tests.conftest import make_input, make_model, run


def stored_numel(path) -> int:
    with safe_open(str(path / "adapter.safetensors"), framework="pt") as f:
        return sum(math.prod(f.get_slice(k).get_shape()) for k in f.keys())


def stored_keys(path) -> list[str]:
    with safe_open(str(path / "adapter.safetensors"), framework="pt") as f:
        return list(f.keys())


def lin(in_f: int, out_f: int, seed: int = 0) -> nn.Sequential:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(in_f, out_f))


# BERT tiny: targets query, value in 2 layers, each Linear(16 -> 16): L = 4 targets, d = 16
BERT_TARGETS, D = 4, 16


# ============================================================== LoRA-FA
def test_lora_fa_counts_only_B(tmp_path):
    r = 4
    model = make_model("bert")
    ad = dk.attach(model, LoraFAConfig(r=r))
    # paper: trainable = sum over targets of d_out * r (A frozen)
    assert ad.num_parameters(trainable_only=True) == BERT_TARGETS * D * r
    dk.save_adapter(ad, tmp_path / "a")
    assert stored_numel(tmp_path / "a") == BERT_TARGETS * D * r       # A regenerates from the seed
    assert not any(k.endswith("lora_A") for k in stored_keys(tmp_path / "a"))


def test_lora_fa_A_frozen_and_regenerated():
    model = lin(6, 5)
    x = torch.randn(3, 6)
    y0 = model(x)
    ad = dk.attach(model, LoraFAConfig(r=2, seed=7, targets=["0"]))
    d = dict(ad.deltas())["0"]
    torch.testing.assert_close(model(x), y0, rtol=0, atol=0)          # B = 0: starts at the base
    A0 = d.lora_A.clone()
    torch.testing.assert_close(A0, seeded_init((2, 6), "kaiming", 7, "0"))
    opt = torch.optim.SGD(ad.parameters(), lr=0.1)
    model(x).pow(2).sum().backward()
    opt.step()
    assert torch.equal(d.lora_A, A0) and d.lora_B.abs().sum() > 0      # only B moved
    other = dk.attach(lin(6, 5), LoraFAConfig(r=2, seed=8, targets=["0"]))
    assert not torch.allclose(dict(other.deltas())["0"].lora_A, A0)


# ============================================================== DoRA
def test_dora_counts(tmp_path):
    r = 4
    model = make_model("bert")
    ad = dk.attach(model, DoraConfig(r=r))
    # paper: per target r (d_in + d_out) + d_out (magnitude)
    expect = BERT_TARGETS * (r * (D + D) + D)
    assert ad.num_parameters(trainable_only=True) == expect == ad.num_parameters()
    dk.save_adapter(ad, tmp_path / "a")
    assert stored_numel(tmp_path / "a") == expect


def test_dora_init_is_base_and_magnitude_is_column_norm():
    model = lin(5, 3)
    W = model[0].weight.detach().clone()
    x = torch.randn(4, 5)
    y0 = model(x)
    ad = dk.attach(model, DoraConfig(r=2, targets=["0"]))
    d = dict(ad.deltas())["0"]
    torch.testing.assert_close(d.magnitude.detach(), W.norm(dim=1))
    assert torch.equal(model(x), y0)


def test_dora_hand_numbers_linear_and_conv1d():
    from transformers.pytorch_utils import Conv1D
    # W = [[3, 4], [0, 1]], A = [[1, 0]], B = [[0], [1]], s = 1, m = [10, 2]
    # W + BA = [[3, 4], [1, 1]]; row norms [5, sqrt 2]; W' = [[6, 8], [sqrt 2, sqrt 2]]
    W = torch.tensor([[3.0, 4.0], [0.0, 1.0]])
    want = torch.tensor([[6.0, 8.0], [math.sqrt(2), math.sqrt(2)]]) - W
    model = nn.Sequential(nn.Linear(2, 2, bias=False))
    model[0].weight.data.copy_(W)
    ad = dk.attach(model, DoraConfig(r=1, alpha=1.0, targets=["0"]))
    d = dict(ad.deltas())["0"]
    with torch.no_grad():
        d.lora_A.copy_(torch.tensor([[1.0, 0.0]]))
        d.lora_B.copy_(torch.tensor([[0.0], [1.0]]))
        d.magnitude.copy_(torch.tensor([10.0, 2.0]))
    torch.testing.assert_close(dict(ad.delta_weights())["0.weight"], want)
    # GPT-2's Conv1D stores W^T: the same update, transposed
    conv = nn.Sequential(Conv1D(2, 2))
    conv[0].weight.data.copy_(W.t())
    ad2 = dk.attach(conv, DoraConfig(r=1, alpha=1.0, targets=["0"]))
    d2 = dict(ad2.deltas())["0"]
    with torch.no_grad():
        d2.lora_A.copy_(d.lora_A)
        d2.lora_B.copy_(d.lora_B)
        d2.magnitude.copy_(d.magnitude)
    torch.testing.assert_close(dict(ad2.delta_weights())["0.weight"], want.t())


def test_dora_gradient_modes():
    # detach_norm changes the gradient, never the value
    outs, grads = [], []
    for detach in (True, False):
        model = lin(4, 3)
        ad = dk.attach(model, DoraConfig(r=2, detach_norm=detach, targets=["0"]))
        d = dict(ad.deltas())["0"]
        torch.manual_seed(1)
        with torch.no_grad():
            d.lora_B.normal_()
        y = model(torch.ones(2, 4))
        y.pow(2).sum().backward()
        outs.append(y.detach())
        grads.append(d.lora_A.grad.clone())
    torch.testing.assert_close(outs[0], outs[1])
    assert not torch.allclose(grads[0], grads[1])


def test_dora_parity_with_peft():
    peft = pytest.importorskip("peft")
    base = lin(6, 5, seed=3)
    ref = lin(6, 5, seed=3)
    x = torch.randn(4, 6)
    pm = peft.get_peft_model(ref, peft.LoraConfig(r=2, lora_alpha=4, target_modules=["0"], use_dora=True))
    ad = dk.attach(base, DoraConfig(r=2, alpha=4.0, targets=["0"]))
    d = dict(ad.deltas())["0"]
    layer = pm.base_model.model[0]
    torch.manual_seed(5)
    with torch.no_grad():
        layer.lora_B["default"].weight.normal_()
        d.lora_A.copy_(layer.lora_A["default"].weight)
        d.lora_B.copy_(layer.lora_B["default"].weight)
        torch.testing.assert_close(d.magnitude, layer.lora_magnitude_vector["default"].weight)
    torch.testing.assert_close(base(x), pm(x), rtol=1e-5, atol=1e-5)


# ============================================================== PiSSA
@pytest.mark.parametrize("offset", ["recompute", "store"])
def test_pissa_counts(tmp_path, offset):
    r = 4
    model = make_model("bert")
    ad = dk.attach(model, PissaConfig(r=r, offset=offset))
    per = r * (D + D)                                  # paper: r (m + n) trainable per target
    assert ad.num_parameters(trainable_only=True) == BERT_TARGETS * per
    dk.save_adapter(ad, tmp_path / "a")
    # recompute: only A, B (offset re-derived from the fingerprinted base); store: + A0, B0
    assert stored_numel(tmp_path / "a") == BERT_TARGETS * per * (1 if offset == "recompute" else 2)


def test_pissa_init_principal_part_and_starts_at_base():
    model = lin(7, 5)
    W = model[0].weight.detach().clone()
    x = torch.randn(3, 7)
    y0 = model(x)
    r, alpha = 2, 8.0
    ad = dk.attach(model, PissaConfig(r=r, alpha=alpha, targets=["0"]))
    d = dict(ad.deltas())["0"]
    s = alpha / r
    S = torch.linalg.svdvals(W)
    principal = s * d.lora_B @ d.lora_A
    # s B0 A0 is the best rank-r approximation: the residual carries the tail singular values
    torch.testing.assert_close(torch.linalg.matrix_norm(W - principal) ** 2, S[r:].pow(2).sum())
    torch.testing.assert_close(torch.linalg.svdvals(principal)[:r], S[:r])
    # A = sqrt(S_r / s) V_r^T: rows of A have norm sqrt(S_i / s)
    torch.testing.assert_close(d.lora_A.norm(dim=1), (S[:r] / s).sqrt())
    assert torch.equal(dict(ad.delta_weights())["0.weight"], torch.zeros_like(W))
    assert torch.equal(model(x), y0)


def test_pissa_parity_with_peft():
    peft = pytest.importorskip("peft")
    base = lin(6, 5, seed=4)
    ref = lin(6, 5, seed=4)
    x = torch.randn(4, 6)
    pm = peft.get_peft_model(ref, peft.LoraConfig(r=2, lora_alpha=4, target_modules=["0"],
                                                  init_lora_weights="pissa"))
    ad = dk.attach(base, PissaConfig(r=2, alpha=4.0, targets=["0"]))
    d = dict(ad.deltas())["0"]
    layer = pm.base_model.model[0]
    torch.testing.assert_close(base(x), pm(x), rtol=1e-5, atol=1e-5)   # both start at the base
    torch.manual_seed(6)
    with torch.no_grad():
        layer.lora_A["default"].weight.add_(0.3 * torch.randn(2, 6))
        layer.lora_B["default"].weight.add_(0.3 * torch.randn(5, 2))
        # peft's factors may differ from ours by a sign per singular pair, but the
        # offset s B0 A0 is sign-invariant: copying theirs into ours must agree
        d.lora_A.copy_(layer.lora_A["default"].weight)
        d.lora_B.copy_(layer.lora_B["default"].weight)
    torch.testing.assert_close(base(x), pm(x), rtol=1e-4, atol=1e-5)


def test_pissa_rank_too_large():
    with pytest.raises(dk.ConfigError, match="at most min"):
        dk.attach(lin(3, 2), PissaConfig(r=3, targets=["0"]))


# ============================================================== Tied-LoRA
def test_tied_lora_counts(tmp_path):
    r = 4
    model = make_model("bert")
    ad = dk.attach(model, TiedLoraConfig(r=r))
    # one (A, B) pair for the single target shape 16x16 + per target u (r) and v (d_out)
    expect = r * D + D * r + BERT_TARGETS * (r + D)
    assert ad.num_parameters(trainable_only=True) == expect
    dk.save_adapter(ad, tmp_path / "a")
    assert stored_numel(tmp_path / "a") == expect
    # VeRA-like variant: A, B frozen random (regenerated, not stored), only u, v
    model = make_model("bert")
    ad = dk.attach(model, TiedLoraConfig(r=r, trainable=("u", "v")))
    assert ad.num_parameters(trainable_only=True) == BERT_TARGETS * (r + D)
    dk.save_adapter(ad, tmp_path / "b")
    assert stored_numel(tmp_path / "b") == BERT_TARGETS * (r + D)


def test_tied_lora_gpt2_shapes_share_one_pair():
    r = 2
    model = make_model("gpt2")
    ad = dk.attach(model, TiedLoraConfig(r=r))   # c_attn: Conv1D 16 -> 48 in 2 layers
    assert ad.num_parameters() == r * 16 + 48 * r + 2 * (r + 48)
    ptrs = {d._shared.lora_A.data_ptr() for _, d in ad.deltas()}
    assert len(ptrs) == 1


@pytest.mark.parametrize("trainable", [("A", "B", "u", "v"), ("A", "B"), ("u", "v"), ("B", "u")])
def test_tied_lora_starts_at_base(trainable):
    model = make_model("llama")
    x = make_input("llama")
    y0 = run(model, x)
    ad = dk.attach(model, TiedLoraConfig(r=2, trainable=trainable))
    torch.testing.assert_close(run(model, x), y0, rtol=0, atol=0)
    assert {n.rsplit(".", 1)[-1] for n, p in ad.named_parameters()} <= {"lora_A", "lora_B", "u", "v"}
    assert {n.rsplit(".", 1)[-1].replace("lora_", "") for n, _ in ad.named_parameters()} == set(trainable)


def test_tied_lora_hand_numbers():
    # dW = s diag(v) B diag(u) A with A = [[1, 2]], B = [[1], [3]], u = [2], v = [1, -1], s = 1
    # B diag(u) A = [[2, 4], [6, 12]]; diag(v) . = [[2, 4], [-6, -12]]
    model = nn.Sequential(nn.Linear(2, 2), nn.Linear(2, 2))
    ad = dk.attach(model, TiedLoraConfig(r=1, alpha=1.0, targets=["0", "1"]))
    d0, d1 = (d for _, d in ad.deltas())
    with torch.no_grad():
        d0._shared.lora_A.copy_(torch.tensor([[1.0, 2.0]]))
        d0._shared.lora_B.copy_(torch.tensor([[1.0], [3.0]]))
        d0.u.fill_(2.0)
        d0.v.copy_(torch.tensor([1.0, -1.0]))
    dws = dict(ad.delta_weights())
    torch.testing.assert_close(dws["0.weight"], torch.tensor([[2.0, 4.0], [-6.0, -12.0]]))
    torch.testing.assert_close(dws["1.weight"], torch.tensor([[1.0, 2.0], [3.0, 6.0]]))  # same A, B; u = v = 1


def test_tied_lora_bad_variant():
    with pytest.raises(dk.ConfigError, match="'B' or 'v'"):
        TiedLoraConfig(trainable=("A", "u"))
    with pytest.raises(dk.ConfigError, match="subset"):
        TiedLoraConfig(trainable=("C",))


# ============================================================== AdaLoRA
def test_adalora_counts(tmp_path):
    r = 6
    model = make_model("bert")
    ad = dk.attach(model, AdaLoraConfig(init_r=r, target_r=2, total_step=10))
    # paper: per target r (d1 + d2 + 1): P (d1 x r), Lambda (r), Q (r x d2)
    assert ad.num_parameters(trainable_only=True) == BERT_TARGETS * r * (D + D + 1)
    dk.save_adapter(ad, tmp_path / "a")
    # + the int8 state of each triplet (the rank pattern)
    assert stored_numel(tmp_path / "a") == BERT_TARGETS * (r * (D + D + 1) + r)


def test_adalora_starts_at_base():
    model = make_model("gpt2")
    x = make_input("gpt2")
    y0 = run(model, x)
    dk.attach(model, AdaLoraConfig(init_r=4, target_r=2))
    torch.testing.assert_close(run(model, x), y0, rtol=0, atol=0)      # lambda = 0


def test_adalora_budget_schedule_numbers():
    model = make_model("bert")
    ad = dk.attach(model, AdaLoraConfig(init_r=4, target_r=2, tinit=2, tfinal=2, deltaT=2, total_step=12))
    cb = AdaLoRABudget(ad)
    b0, bT = 4 * BERT_TARGETS, 2 * BERT_TARGETS                        # 16, 8
    assert cb.budget(2) == (b0, False)
    # t = 3: 1 - (3 - 2) / (12 - 2 - 2) = 0.875; 8 + 8 * 0.875^3 = 13.36 -> 13, 3 % 2 != 0
    assert cb.budget(3) == (13, False)
    # t = 6: 1 - 4 / 8 = 0.5; 8 + 8 / 8 = 9
    assert cb.budget(6) == (9, True)
    assert cb.budget(10) == (bT, True) and cb.budget(12) == (bT, True)


def test_sensitivity_ema_hand_numbers():
    w = nn.Parameter(torch.tensor([2.0, -1.0]))
    sens = Sensitivity({"w": w}, beta1=0.5, beta2=0.5)
    (w * torch.tensor([3.0, 4.0])).sum().backward()       # grad = [3, 4]; I = |w g| = [6, 4]
    sens.update()
    # I_bar = 0.5 * I = [3, 2]; U_bar = 0.5 |I - I_bar| = [1.5, 1]; s = [4.5, 2]
    torch.testing.assert_close(sens.score("w"), torch.tensor([4.5, 2.0]))
    sens.close()


def test_adalora_regularizer_hand_numbers():
    model = lin(2, 2)
    ad = dk.attach(model, AdaLoraConfig(init_r=2, target_r=1, orth_reg_weight=0.5, targets=["0"]))
    d = dict(ad.deltas())["0"]
    with torch.no_grad():
        d.lora_A.copy_(torch.eye(2))                       # Q Q^T = I -> 0
        d.lora_B.copy_(2 * torch.eye(2))                   # P^T P - I = 3 I -> ||.||_F^2 = 18
    torch.testing.assert_close(regularizer(model), torch.tensor(0.5 * 18.0))


def test_adalora_parity_with_peft():
    peft = pytest.importorskip("peft")
    base = lin(6, 5, seed=2)
    ref = lin(6, 5, seed=2)
    x = torch.randn(4, 6)
    pm = peft.get_peft_model(ref, peft.AdaLoraConfig(init_r=3, target_r=2, lora_alpha=3, target_modules=["0"],
                                                     total_step=10))
    ad = dk.attach(base, AdaLoraConfig(init_r=3, target_r=2, alpha=3.0, targets=["0"]))
    d = dict(ad.deltas())["0"]
    layer = pm.base_model.model[0]
    torch.manual_seed(7)
    with torch.no_grad():
        layer.lora_E["default"].normal_()
        d.lora_A.copy_(layer.lora_A["default"])
        d.lora_B.copy_(layer.lora_B["default"])
        d.lora_E.copy_(layer.lora_E["default"].flatten())
    # peft scales by alpha / (ranknum + 1e-5): equal to ours up to ~3e-6 relative
    torch.testing.assert_close(base(x), pm(x), rtol=1e-5, atol=1e-5)


def _train(model, x, callback, steps, reg=None, lr=0.05):
    opt = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=lr)
    target = torch.randn_like(run(model, x).detach())
    for step in range(1, steps + 1):
        loss = (run(model, x) - target).pow(2).mean()
        if reg is not None:
            loss = loss + reg(model)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)    # before on_step, as deltakit's loop does
        callback.on_step(step, model)


def test_adalora_total_rank_reaches_budget(tmp_path):
    torch.manual_seed(0)
    model = make_model("bert")
    x = make_input("bert")
    ad = dk.attach(model, AdaLoraConfig(init_r=4, target_r=2, tinit=2, tfinal=2, deltaT=2, total_step=12))
    cb = AdaLoRABudget(ad)
    _train(model, x, cb, 12, reg=cb.regularizer)
    assert cb.total_rank() == 2 * BERT_TARGETS
    assert sum(cb.rank_pattern().values()) == 2 * BERT_TARGETS
    for _, d in ad.deltas():
        assert torch.all(d.lora_E[d.state == 0] == 0)                  # pruned lambda zeroed
    # the pattern is saved: the reloaded adapter computes the same function
    model.eval()
    y = run(model, x).detach()
    dk.save_adapter(ad, tmp_path / "a")
    fresh = make_model("bert")
    loaded = dk.load_adapter(fresh, tmp_path / "a")
    torch.testing.assert_close(run(fresh, x), y, rtol=0, atol=0)
    assert sum(d.rank() for _, d in loaded.deltas()) == 2 * BERT_TARGETS


# ============================================================== IncreLoRA
def test_increlora_counts(tmp_path):
    cfg = IncreLoraConfig(init_r=2, target_r=4, max_r=8)
    model = make_model("bert")
    ad = dk.attach(model, cfg)
    # allocated: max_r (d1 + d2 + 1) per target; the paper's active count is r_k (d1 + d2 + 1)
    assert ad.num_parameters(trainable_only=True) == BERT_TARGETS * 8 * (D + D + 1)
    dk.save_adapter(ad, tmp_path / "a")
    assert stored_numel(tmp_path / "a") == BERT_TARGETS * (8 * (D + D + 1) + 8)   # + state
    cb = IncreLoRABudget(ad)
    assert cb.total_rank() == BERT_TARGETS * 2


def test_increlora_init():
    model = lin(6, 5)
    x = torch.randn(3, 6)
    y0 = model(x)
    ad = dk.attach(model, IncreLoraConfig(init_r=1, target_r=2, max_r=4, advance_learning=False, targets=["0"]))
    assert torch.equal(model(x), y0)                                  # lambda = 0, no reserve
    dk.detach(model, "default")
    ad = dk.attach(model, IncreLoraConfig(init_r=1, target_r=2, max_r=4, targets=["0"]))
    d = dict(ad.deltas())["0"]
    assert d.state.tolist() == [2, 1, 0, 0]                            # on, reserve (incre_r = 1), off
    # the reserve contributes s * 1e-5 * P_res Q_res only
    torch.testing.assert_close(model(x), y0, rtol=0, atol=1e-6)


def test_increlora_score_is_dw_times_its_gradient():
    model = lin(4, 3)
    ad = dk.attach(model, IncreLoraConfig(init_r=2, target_r=3, max_r=4, targets=["0"]))
    d = dict(ad.deltas())["0"]
    with torch.no_grad():
        d.lora_E.normal_()
    IncreLoRABudget(ad)                                  # switches tracking on
    x = torch.randn(5, 4)
    model(x).pow(2).sum().backward()
    # reference: the same loss with dW as an explicit leaf
    W = model[0].base.weight.detach()
    b = model[0].base.bias.detach()
    dw = ((d.lora_B * d.lam()) @ d.lora_A * d.scale).detach().requires_grad_(True)
    (x @ (W + dw).t() + b).pow(2).sum().backward()
    want = (dw.detach() * dw.grad).abs().sum() / math.sqrt(dw.numel())
    torch.testing.assert_close(d.score, want)


def test_increlora_total_rank_reaches_budget(tmp_path):
    torch.manual_seed(0)
    model = make_model("bert")
    x = make_input("bert")
    cfg = IncreLoraConfig(init_r=1, target_r=3, max_r=6, incre_r=2, top_h=2, tinit=1, deltaT=2)
    ad = dk.attach(model, cfg)
    cb = IncreLoRABudget(ad)
    _train(model, x, cb, 12, reg=cb.regularizer)
    assert cb.finished
    assert cb.total_rank() == 3 * BERT_TARGETS
    assert max(cb.rank_pattern().values()) <= 6
    assert all(int((d.state == 1).sum()) == 0 for _, d in ad.deltas())   # reserves off at the end
    model.eval()
    y = run(model, x).detach()
    dk.save_adapter(ad, tmp_path / "a")
    fresh = make_model("bert")
    loaded = dk.load_adapter(fresh, tmp_path / "a")
    torch.testing.assert_close(run(fresh, x), y, rtol=0, atol=0)
    assert sum(d.rank() for _, d in loaded.deltas()) == 3 * BERT_TARGETS


def test_increlora_growth_follows_scores():
    model = nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 4))
    ad = dk.attach(model, IncreLoraConfig(init_r=1, target_r=2, max_r=4, incre_r=1, top_h=1,
                                          targets=["0", "1"]))
    cb = IncreLoRABudget(ad)
    cb.i_bar, cb.u_bar = {"0": 1.0, "1": 3.0}, {"0": 1.0, "1": 1.0}
    d1 = dict(ad.deltas())["1"]
    d1.lora_E.data[1] = 123.0                               # reserve's lambda is not used ...
    cb.grow()
    assert cb.rank_pattern() == {"0": 1, "1": 2}
    assert d1.lora_E[1].item() == pytest.approx(1e-5)        # ... it switches on at the reserve value
    assert d1.state.tolist() == [2, 2, 1, 0]


def test_increlora_config_errors():
    with pytest.raises(dk.ConfigError, match="init_r <= target_r <= max_r"):
        IncreLoraConfig(init_r=4, target_r=2)
    with pytest.raises(dk.ConfigError, match="room for the reserved"):
        IncreLoraConfig(init_r=2, target_r=3, max_r=3, incre_r=2)


# ============================================================== task vectors
@pytest.mark.parametrize("kind", ["gpt2", "llama"])
@pytest.mark.parametrize("cfg", [LoraFAConfig(r=2), DoraConfig(r=2), PissaConfig(r=2), TiedLoraConfig(r=2),
                                 AdaLoraConfig(init_r=3, target_r=2), IncreLoraConfig(init_r=1, target_r=2, max_r=4)],
                         ids=lambda c: c.method)
def test_task_vector_equals_dense_delta(cfg, kind):
    # factored (LowRank) or dense, the task vector must hold exactly the layer's dW
    model = make_model(kind)
    ad = dk.attach(model, cfg)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in ad.parameters():
            p.add_(0.2 * torch.randn(p.shape, generator=g))
    tv = dk.TaskVector.from_adapter(ad)
    dense = dict(ad.delta_weights())
    assert set(tv.keys()) == set(dense)
    for k, dw in dense.items():
        torch.testing.assert_close(tv.dense(k), dw, rtol=1e-5, atol=1e-6)


def test_pissa_randomized_svd_reproducible(tmp_path):
    model = make_model("llama")
    x = make_input("llama")
    y0 = run(model, x)
    ad = dk.attach(model, PissaConfig(r=2, svd_niter=4))
    torch.testing.assert_close(run(model, x), y0, rtol=0, atol=0)    # still starts at the base
    with torch.no_grad():
        for p in ad.parameters():
            p.add_(0.1)
    y = run(model, x).detach()
    dk.save_adapter(ad, tmp_path / "a")
    fresh = make_model("llama")
    dk.load_adapter(fresh, tmp_path / "a")                           # offset re-derived: same seed
    torch.testing.assert_close(run(fresh, x), y, rtol=0, atol=0)
