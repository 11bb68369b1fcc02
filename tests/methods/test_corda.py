"""CorDA: hand-worked decomposition, parity with peft 0.21's CorDA, counts, the contract."""
from __future__ import annotations

import copy
import math

import pytest
import torch
from safetensors import safe_open
from torch import nn

import deltakit as dk
from deltakit.methods.corda import CordaConfig, calibrate, corda_factors, covariances, init_from_covariances
from tests.conftest import run
from tests.methods._data_contract import check_contract


def _two_by_two(mode: str):
    m = nn.Sequential(nn.Linear(2, 2, bias=False))
    with torch.no_grad():
        m[0].weight.copy_(torch.tensor([[3.0, 0.0], [0.0, 1.0]]))
    ad = dk.attach(m, CordaConfig(r=1, alpha=1.0, mode=mode, targets=["0"]))
    # E[x x^T] = diag(0, 2): the input never uses feature 0, feature 1 has variance 2
    s2 = math.sqrt(2.0)
    covs = calibrate(ad, [torch.tensor([[0.0, s2], [0.0, -s2]])])
    return m, ad, covs


def test_hand_worked_context_orders_the_components():
    """W = diag(3, 1), C = diag(0, 2). Damped: C + 0.01 * mean(diag C) I = diag(0.01, 2.01), so
    W C = diag(0.03, 2.01): by context the *second* component is the principal one (PiSSA,
    which looks at W alone, would pick the first). ipm adapts it, kpm the other."""
    m, ad, covs = _two_by_two("ipm")
    torch.testing.assert_close(covs["0"], torch.diag(torch.tensor([0.0, 2.0])))
    d = m[0].deltas["default"]
    # S = 2.01, U = Vh = +-e2, V = Vh C^-1 = +-e2 / 2.01; s = alpha / r = 1
    torch.testing.assert_close(d.lora_A.abs(), torch.tensor([[0.0, 1 / math.sqrt(2.01)]]))
    torch.testing.assert_close(d.lora_B.abs(), torch.tensor([[0.0], [math.sqrt(2.01)]]))
    torch.testing.assert_close(d.offset(), torch.tensor([[0.0, 0.0], [0.0, 1.0]]))   # s B0 A0
    _, ad_k, _ = _two_by_two("kpm")
    torch.testing.assert_close(ad_k.model[0].deltas["default"].offset(), torch.tensor([[3.0, 0.0], [0.0, 0.0]]))
    # the model starts equal to the base; a trained B moves only the adapted component
    x = torch.tensor([[1.0, 1.0]])
    torch.testing.assert_close(m(x), torch.tensor([[3.0, 1.0]]), rtol=0, atol=0)
    with torch.no_grad():
        d.lora_B.mul_(2.0)                   # s B A = 2 e2 e2^T, so W' = diag(3, 2)
    torch.testing.assert_close(m(x), torch.tensor([[3.0, 2.0]]))


def test_factors_reconstruct_the_weight_and_damping_doubles():
    g = torch.Generator().manual_seed(0)
    W = torch.randn(5, 4, generator=g)
    X = torch.randn(50, 4, generator=g)
    C = X.T @ X / 50
    A_top, B_top = corda_factors(W, C, 4, "ipm", 1.0)         # full rank: W C C^-1 = W
    torch.testing.assert_close(B_top @ A_top, W, rtol=1e-4, atol=1e-4)
    A1, B1 = corda_factors(W, C, 2, "ipm", 1.0)
    A2, B2 = corda_factors(W, C, 2, "kpm", 1.0)
    torch.testing.assert_close(B1 @ A1 + B2 @ A2, W, rtol=1e-4, atol=1e-4)   # top-2 + bottom-2 = all
    # a rank-deficient C (one direction only) still inverts after damping
    A, B = corda_factors(W, torch.outer(X[0], X[0]), 1, "ipm", 2.0)
    assert torch.isfinite(A).all() and A.shape == (1, 4) and B.shape == (5, 1)
    with pytest.raises(ValueError, match="finite"):
        corda_factors(W, torch.full((4, 4), float("nan")), 1, "ipm", 1.0)
    with pytest.raises(ValueError, match=r"shape \(4, 4\)"):
        corda_factors(W, torch.eye(3), 1, "ipm", 1.0)


class _Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(6, 5), nn.Linear(5, 4)

    def forward(self, x):
        return self.fc2(torch.tanh(self.fc1(x)))


@pytest.mark.parametrize("mode", ["ipm", "kpm"])
def test_matches_peft_corda(mode):
    """peft 0.21's CorDA on the same net and data. Given peft's own covariance our factors equal
    peft's lora_A / lora_B, and our frozen residual W - s B0 A0 equals peft's rewritten base
    weight; from data (our C = E[x x^T], peft's a max-normalised X^T X) the adapted product
    s B0 A0 is the same, since it does not depend on C's scale."""
    from peft import LoraConfig as PeftLora, get_peft_model
    from peft.tuners.lora.config import CordaConfig as PeftCorda
    from peft.tuners.lora.corda import preprocess_corda

    torch.manual_seed(0)
    net = _Net()
    x = torch.randn(1, 40, 6)
    ours_net, ours_data_net = copy.deepcopy(net), copy.deepcopy(net)
    pcfg = PeftLora(r=2, lora_alpha=4, target_modules=["fc1", "fc2"], init_lora_weights="corda",
                    corda_config=PeftCorda(corda_method=mode, prune_temporary_fields=False))
    preprocess_corda(net, pcfg, run_model=lambda: net(x))
    peft_cov = {n: net.get_submodule(n).covariance_matrix.clone() for n in ("fc1", "fc2")}
    pm = get_peft_model(net, pcfg)
    cfg = CordaConfig(r=2, alpha=4.0, mode=mode, targets=["fc1", "fc2"])
    ad = dk.attach(ours_net, cfg)
    init_from_covariances(ad, peft_cov)
    ad_data = dk.attach(ours_data_net, cfg)
    calibrate(ad_data, [x])
    for n in ("fc1", "fc2"):
        peft_layer = pm.base_model.model.get_submodule(n)
        d = ours_net.get_submodule(n).deltas["default"]
        torch.testing.assert_close(d.lora_A, peft_layer.lora_A["default"].weight, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(d.lora_B, peft_layer.lora_B["default"].weight, rtol=1e-5, atol=1e-6)
        w = ours_net.get_submodule(n).base.weight
        torch.testing.assert_close(w - d.offset(), peft_layer.base_layer.weight, rtol=1e-5, atol=1e-6)
        d_data = ours_data_net.get_submodule(n).deltas["default"]
        torch.testing.assert_close(d_data.offset(), d.offset(), rtol=1e-4, atol=1e-5)
    # and the adapted forward is peft's (the residual + s B A at init is W)
    torch.testing.assert_close(ours_net(x), pm(x), rtol=1e-5, atol=1e-5)


def test_counts_and_file(tmp_path):
    """Trainable r (in + out) per target, as LoRA; the file also holds the frozen offset
    (another r (in + out)) and the calibrated flag."""
    torch.manual_seed(0)
    net = _Net()
    ad = dk.attach(net, CordaConfig(r=2, targets=["fc1", "fc2"]))
    calibrate(ad, [torch.randn(8, 6)])
    lora = 2 * (6 + 5) + 2 * (5 + 4)
    assert ad.num_parameters(trainable_only=True) == lora
    dk.save_adapter(ad, tmp_path / "ad")
    with safe_open(str(tmp_path / "ad" / "adapter.safetensors"), "pt") as f:
        assert sum(f.get_tensor(k).numel() for k in f.keys()) == 2 * lora + 2


def test_refuses_before_calibration_and_twice():
    net = _Net()
    ad = dk.attach(net, CordaConfig(r=2, targets=["fc1"]))
    with pytest.raises(dk.DeltaStateError, match="not calibrated"):
        net(torch.randn(2, 6))
    with pytest.raises(dk.DeltaStateError, match="not calibrated"):
        dk.TaskVector.from_adapter(ad)
    with pytest.raises(ValueError, match=r"covariance for every target.*fc1"):
        init_from_covariances(ad, {})
    calibrate(ad, [torch.randn(4, 6)])
    with pytest.raises(dk.DeltaStateError, match="already calibrated"):
        calibrate(ad, [torch.randn(4, 6)])
    with pytest.raises(dk.ConfigError, match="at most min"):
        dk.attach(_Net(), CordaConfig(r=6, targets=["fc2"]))
    lora = dk.attach(_Net(), dk.LoraConfig(r=2, targets=["fc1"]))
    with pytest.raises(dk.ConfigError, match="expected a 'corda' adapter"):
        covariances(lora, [torch.randn(2, 6)])


def test_covariance_skips_padding():
    """The statistics hook drops padded positions (attention_mask), as for RegMean."""
    net = _Net()
    ad = dk.attach(net, CordaConfig(r=1, targets=["fc1"]))
    x = torch.randn(1, 3, 6)
    covs = covariances(ad, [{"x": x, "attention_mask": torch.tensor([[1, 1, 0]])}],
                       forward=lambda m, b: m(b["x"]))
    keep = x[0, :2]
    torch.testing.assert_close(covs["fc1"], keep.T @ keep / 2)


@pytest.mark.parametrize("kind,mode", [("bert", "ipm"), ("gpt2", "kpm"), ("llama", "ipm")])
def test_contract_after_calibration(kind, mode, tmp_path):
    def prepare(adapter, model, x):
        calibrate(adapter, [x], forward=run)
        dk.set_active(model, adapter.name)
        with dk.disabled(model):
            y_base = run(model, x).detach()
        torch.testing.assert_close(run(model, x).detach(), y_base, rtol=0, atol=0)   # starts at the base

    check_contract(kind, CordaConfig(r=2, mode=mode), prepare, tmp_path)
