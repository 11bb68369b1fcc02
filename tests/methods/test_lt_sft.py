"""LT-SFT: hand-worked global top-K mask, counts, composition by addition, one run == two runs."""
from __future__ import annotations

import pytest
import torch
from safetensors import safe_open
from torch import nn

import deltakit as dk
from deltakit.methods.lt_sft import LtSftConfig, LtSftSchedule, l1_penalty, select_mask
from tests.methods._data_contract import check_contract


def _set(t: torch.Tensor, values) -> None:
    with torch.no_grad():
        t.copy_(torch.tensor(values, dtype=t.dtype))


def _two_layers():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(3, 2), nn.Linear(2, 1, bias=False))


def test_hand_worked_global_top_k():
    """Targets 0 (weight 2x3 + bias 2 = 8 entries) and 1 (weight 1x2 = 2): N = 10, density 0.3
    gives K = 3, chosen over both targets together by |theta1 - theta0|."""
    m = _two_layers()
    x = torch.randn(4, 3)
    y0 = m(x).detach()
    ad = dk.attach(m, LtSftConfig(density=0.3, targets=["0", "1"]))
    d0, d1 = m[0].deltas["default"], m[1].deltas["default"]
    assert ad.num_parameters(trainable_only=True) == 10 + 3          # phase 1: all, plus the K values
    _set(d0.full["weight"], [[0.1, -0.9, 0.0], [0.2, 0.3, -0.05]])
    _set(d0.full["bias"], [0.0, 0.8])
    _set(d1.full["weight"], [[-0.5, 0.25]])
    # |dW| over [w0 (6), b0 (2), w1 (2)]: the three largest are 0.9 (pos 1), 0.8 (pos 7), 0.5 (pos 8)
    assert torch.allclose(l1_penalty(ad), torch.tensor((0.1 + 0.9 + 0.2 + 0.3 + 0.05 + 0.8 + 0.5 + 0.25) / 10))
    select_mask(ad)
    assert d0.indices.tolist() == [1, 7] and int(d0.offset) == 0
    assert d1.indices.tolist() == [0] and int(d1.offset) == 2
    assert ad.num_parameters(trainable_only=True) == 3
    torch.testing.assert_close(m(x), y0, rtol=0, atol=0)              # reset to theta0
    _set(ad.shared.values, [1.0, 2.0, 3.0])
    dw = dict(ad.delta_weights())
    torch.testing.assert_close(dw["0.weight"], torch.tensor([[0.0, 1.0, 0.0], [0.0, 0.0, 0.0]]))
    torch.testing.assert_close(dw["0.bias"], torch.tensor([0.0, 2.0]))
    torch.testing.assert_close(dw["1.weight"], torch.tensor([[3.0, 0.0]]))
    torch.testing.assert_close(l1_penalty(ad), torch.tensor(6.0 / 10))
    with pytest.raises(dk.DeltaStateError, match="already chosen"):
        select_mask(ad)


def test_counts_and_file(tmp_path):
    """Phase 2 trains K = round(density * N) values; the file holds them, their K positions and
    one offset per target. A phase-2 file loads into a freshly attached model."""
    m = _two_layers()
    ad = dk.attach(m, LtSftConfig(density=0.5, targets=["0", "1"]))
    with torch.no_grad():
        for p in ad.parameters():
            p.normal_()
    select_mask(ad)
    k = round(0.5 * 10)
    assert ad.num_parameters(trainable_only=True) == k
    _set(ad.shared.values, [0.5, -1.0, 2.0, 0.25, 3.0])
    x = torch.randn(2, 3)
    y = m(x).detach()
    dk.save_adapter(ad, tmp_path / "ad")
    with safe_open(str(tmp_path / "ad" / "adapter.safetensors"), "pt") as f:
        assert sum(f.get_tensor(key).numel() for key in f.keys()) == 2 * k + 2
    fresh = _two_layers()
    loaded = dk.load_adapter(fresh, tmp_path / "ad")
    torch.testing.assert_close(fresh(x), y, rtol=0, atol=0)
    assert all(d.phase == 2 for _, d in loaded.deltas())


def test_sparse_deltas_compose_by_addition():
    """theta0 + phi_a + phi_b: both adapters active equals the base plus the summed task vectors."""
    m = _two_layers()
    x = torch.randn(5, 3)
    for name, seed in (("lang", 1), ("task", 2)):
        ad = dk.attach(m, LtSftConfig(density=0.4, targets=["0", "1"]), name=name)
        g = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            for p in ad.parameters():
                p.copy_(torch.randn(p.shape, generator=g))
        select_mask(ad)
        _set(ad.shared.values, torch.randn(ad.shared.values.shape, generator=g).tolist())
    dk.set_active(m, ["lang", "task"])
    y_both = m(x).detach()
    tvs = [dk.TaskVector.from_adapter(a) for a in dk.adapters(m).values()]
    summed = tvs[0] + tvs[1]
    ref = _two_layers()
    summed.apply(ref)
    torch.testing.assert_close(ref(x), y_both, rtol=1e-6, atol=1e-6)


def _train(m, ad, steps, opt_at, g, switch=None):
    """A plain AdamW loop (constant lr), a fresh optimiser at each step listed in opt_at."""
    opt = None
    for step in range(1, steps + 1):
        if step in opt_at:
            opt = torch.optim.AdamW([p for p in ad.parameters() if p.requires_grad], lr=0.05, weight_decay=0.01)
        x = torch.randn(8, 3, generator=g)
        loss = (m(x) - x.sum(-1, keepdim=True)).pow(2).mean()
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        if switch is not None:
            switch(step)


def test_one_run_equals_the_papers_two_runs():
    """The schedule's phase 2 in one optimiser == a new optimiser for phase 2 (constant lr):
    the K values never had a gradient in phase 1, so their AdamW state starts fresh."""
    m1, m2 = _two_layers(), _two_layers()
    a1 = dk.attach(m1, LtSftConfig(density=0.3, targets=["0", "1"]))
    cb = LtSftSchedule(a1, switch_step=4)
    _train(m1, a1, 8, {1}, torch.Generator().manual_seed(0), switch=lambda s: cb.on_step(s, m1))
    a2 = dk.attach(m2, LtSftConfig(density=0.3, targets=["0", "1"]))
    g = torch.Generator().manual_seed(0)      # the same batches, in order, across both runs
    _train(m2, a2, 4, {1}, g)
    select_mask(a2)
    _train(m2, a2, 4, {1}, g)
    d1, d2 = dict(a1.deltas()), dict(a2.deltas())
    assert all(torch.equal(d1[p].indices, d2[p].indices) for p in d1)
    torch.testing.assert_close(a1.shared.values, a2.shared.values, rtol=0, atol=0)
    assert a1.shared.values.abs().min() > 0                             # every chosen value trained
    state = cb.state_dict()
    m3 = _two_layers()
    a3 = dk.attach(m3, LtSftConfig(density=0.3, targets=["0", "1"]))
    LtSftSchedule(a3, 4).load_state_dict(state)                          # a resume restores the mask
    assert all(torch.equal(d.indices, d1[p].indices) for p, d in a3.deltas())


def test_training_hooks_place_the_switch():
    m = _two_layers()
    ad = dk.attach(m, LtSftConfig(density=0.3, full_fraction=0.25, targets=["0", "1"]))
    params, cbs = ad.training_hooks(loader=None, total_steps=40)
    assert params is None and cbs[0].switch_step == 10
    with pytest.raises(dk.ConfigError, match="number of training steps"):
        ad.training_hooks(loader=None, total_steps=None)
    with pytest.raises(dk.ConfigError, match="expected an 'lt_sft' adapter"):
        select_mask(dk.attach(_two_layers(), dk.LoraConfig(r=1, targets=["0"])))


@pytest.mark.parametrize("kind,phase", [("bert", 1), ("gpt2", 2), ("llama", 2)])
def test_contract(kind, phase, tmp_path):
    def prepare(adapter, model, x):
        if phase == 2:
            g = torch.Generator().manual_seed(3)
            with torch.no_grad():
                for p in adapter.parameters():
                    p.copy_(torch.randn(p.shape, generator=g))
            select_mask(adapter)

    check_contract(kind, LtSftConfig(density=0.05), prepare, tmp_path)
