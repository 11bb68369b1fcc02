"""SPT: hand-worked sensitivity and allocation, budget, counts, the contract after calibration."""
from __future__ import annotations

import pytest
import torch
from safetensors import safe_open
from torch import nn

import deltakit as dk
from deltakit.methods.spt import SptConfig, allocate, calibrate
from tests.conftest import run
from tests.methods._data_contract import check_contract


def _scores(*pairs):
    return {f"t{i}": (torch.tensor(w, dtype=torch.float32), None if b is None else torch.tensor(b, dtype=torch.float32))
            for i, (w, b) in enumerate(pairs)}


def test_hand_worked_allocation():
    """t0: 4x4 weight, sensitivities 9, 8, 7 at positions 0, 5, 10. t1: 4x4 weight with 6 at
    position 3, bias [5, 0, 0, 0]. r = 1 so LoRA costs 8 per matrix; ratio 4: a matrix with 2
    sensitive entries gets LoRA; vector ratio 4: one sensitive bias entry tunes the bias whole.
    N = 36. tau = 2 already makes t0 structured (cost 8); tau = 4 adds t1[3] (9); tau = 5 adds
    the whole bias (13); the next entries (zeros, earliest first) fall in t0 (no extra cost)
    until tau = 19 would take a second entry of t1 and make it LoRA (20)."""
    w0 = [0.0] * 16
    w0[0], w0[5], w0[10] = 9.0, 8.0, 7.0
    w1 = [0.0] * 16
    w1[3] = 6.0
    scores = _scores((w0, None), (w1, [5.0, 0.0, 0.0, 0.0]))
    lora = {"t0": 8, "t1": 8}
    cfg = SptConfig(budget=13 / 36, r=1, structured_ratio=4.0, vector_ratio=4.0)
    plans = allocate(scores, cfg, lora)
    assert plans["t0"].structured and plans["t0"].indices.tolist() == []
    assert not plans["t1"].structured and plans["t1"].indices.tolist() == [3, 16, 17, 18, 19]
    plans = allocate(scores, cfg.replace(budget=12 / 36), lora)          # the bias no longer fits
    assert plans["t0"].structured and plans["t1"].indices.tolist() == [3]


def _lin():
    m = nn.Sequential(nn.Linear(3, 2))
    with torch.no_grad():
        m[0].weight.copy_(torch.tensor([[0.5, -1.0, 0.25], [1.5, 0.0, -0.5]]))
        m[0].bias.copy_(torch.tensor([0.1, -0.2]))
    return m


def test_hand_worked_sensitivity():
    """loss = sum_o c_o y_o, so dL/dW[o, i] = c_o x_i and dL/db_o = c_o. With c = (1, -3) and
    the batches x = (1, .1, 2), (1, 0, -1): mean squared gradients W = [[1, .005, 2.5],
    [9, .045, 22.5]], b = [1, 9]. Budget 3 of N = 8: tau = 2 keeps W[1, 2] (22.5) and W[1, 0]
    (9, earlier than b[1]'s tie); tau = 3 would take b[1] and, with vector ratio 2, the whole
    bias (total 4). LoRA (r = 1: 5 parameters) needs 5 sensitive entries at ratio 1."""
    m = _lin()
    c = torch.tensor([1.0, -3.0])
    ad = dk.attach(m, SptConfig(budget=3 / 8, r=1, alpha=1.0, structured_ratio=1.0, vector_ratio=2.0,
                                targets=["0"]))
    batches = [torch.tensor([[1.0, 0.1, 2.0]]), torch.tensor([[1.0, 0.0, -1.0]])]
    plans = calibrate(ad, batches, lambda model, b: (model(b) * c).sum())
    assert not plans["0"].structured and plans["0"].indices.tolist() == [3, 5]
    assert ad.num_parameters(trainable_only=True) == 2
    assert m[0].base.weight.grad is None and not m[0].base.weight.requires_grad
    d = m[0].deltas["default"]
    with torch.no_grad():
        d.values.copy_(torch.tensor([2.0, -1.0]))
    torch.testing.assert_close(d.delta({})["weight"], torch.tensor([[0.0, 0.0, 0.0], [2.0, 0.0, -1.0]]))
    torch.testing.assert_close(d.delta({})["bias"], torch.zeros(2))
    x = torch.tensor([[1.0, 2.0, 3.0]])
    torch.testing.assert_close(m(x), torch.tensor([[-0.75 + 0.1, 1.5 - 0.5 * 3 - 0.2 + 2.0 - 3.0]]))


def test_structured_counts_and_file(tmp_path):
    """A matrix with many sensitive entries gets LoRA: trainable r (in + out) there; the file holds
    the LoRA factors, the positions and values, and the calibrated flag."""
    torch.manual_seed(0)
    m = nn.Sequential(nn.Linear(8, 8, bias=False), nn.Tanh(), nn.Linear(8, 2, bias=False))
    ad = dk.attach(m, SptConfig(budget=0.7, r=2, structured_ratio=10.0, targets=["0", "2"]))
    plans = calibrate(ad, [torch.randn(16, 8)], lambda model, b: model(b).pow(2).sum())
    assert plans["0"].structured and plans["2"].structured           # 2 * (8 + 8) and 2 * (8 + 2)
    assert ad.num_parameters(trainable_only=True) == 32 + 20 <= round(0.7 * (64 + 16))
    dk.save_adapter(ad, tmp_path / "ad")
    with safe_open(str(tmp_path / "ad" / "adapter.safetensors"), "pt") as f:
        assert sum(f.get_tensor(k).numel() for k in f.keys()) == 52 + 2   # + two flags, no positions


def test_refuses_before_calibration_and_twice():
    m = _lin()
    ad = dk.attach(m, SptConfig(targets=["0"]))
    assert ad.num_parameters(trainable_only=True) == 0
    with pytest.raises(dk.DeltaStateError, match="not calibrated"):
        m(torch.randn(1, 3))
    loss = lambda model, b: model(b).sum()   # noqa: E731
    calibrate(ad, [torch.randn(2, 3)], loss)
    with pytest.raises(dk.DeltaStateError, match="already calibrated"):
        calibrate(ad, [torch.randn(2, 3)], loss)
    with pytest.raises(dk.ConfigError, match="expected an 'spt' adapter"):
        calibrate(dk.attach(_lin(), dk.LoraConfig(r=1, targets=["0"])), [torch.randn(2, 3)], loss)


@pytest.mark.parametrize("kind", ["bert", "gpt2", "llama"])
def test_contract_after_calibration(kind, tmp_path):
    def prepare(adapter, model, x):
        calibrate(adapter, [x], lambda mod, b: run(mod, b).float().pow(2).mean())

    check_contract(kind, SptConfig(budget=0.05, r=2, structured_ratio=20.0), prepare, tmp_path)
