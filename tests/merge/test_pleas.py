"""PLeaS (https://arxiv.org/abs/2407.02447): exact recovery of a permuted copy, the side-by-side
limit, the merged size formula, and a real merge of two independently trained MLPs."""
from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

pytest.importorskip("scipy")
from deltakit.merge import match_units, pleas_merge  # noqa: E402


def _mlp(seed, d_in=6, h=(12, 10), d_out=3):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(d_in, h[0]), nn.ReLU(), nn.Linear(h[0], h[1]), nn.Tanh(), nn.Linear(h[1], d_out))


def _permuted(m, seed):
    """The same function with every hidden layer's units shuffled."""
    g = torch.Generator().manual_seed(seed)
    p = copy.deepcopy(m)
    lins = [x for x in p if isinstance(x, nn.Linear)]
    perms = []
    with torch.no_grad():
        for a, b in zip(lins, lins[1:]):
            perm = torch.randperm(a.out_features, generator=g)
            a.weight.copy_(a.weight[perm])
            a.bias.copy_(a.bias[perm])
            b.weight.copy_(b.weight[:, perm])
            perms.append(perm)
    return p, perms


def _x(seed, n=256, d=6):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(64, d, generator=g) for _ in range(n // 64)]


def test_a_permuted_copy_is_matched_and_recovered_exactly():
    a = _mlp(0)
    b, perms = _permuted(a, 1)
    x = torch.cat(_x(2))
    assert torch.allclose(a(x), b(x), atol=1e-6) and not torch.equal(a[0].weight, b[0].weight)
    # unit i of A is unit perm^-1(i) of B: the matching finds it with correlation 1
    feats_a = torch.relu(a[0](x))
    pi, corr = match_units(feats_a, torch.relu(b[0](x)))
    assert torch.equal(pi, perms[0].argsort()) and torch.allclose(corr, torch.ones(12), atol=1e-5)
    res = pleas_merge(a, b, _x(2), ratio=1.0)
    assert res.widths == [12, 10]
    test = torch.cat(_x(3))
    assert torch.allclose(res.model(test), a(test), atol=1e-4)
    assert sum(p.numel() for p in res.model.parameters()) == sum(p.numel() for p in a.parameters())


def test_ratio_zero_keeps_both_side_by_side_and_averages_outputs():
    a, b = _mlp(0), _mlp(1)
    res = pleas_merge(a, b, _x(2), ratio=0.0)
    assert res.widths == [24, 20]  # m + 2 (d - m) with m = 0
    test = torch.cat(_x(3))
    assert torch.allclose(res.model(test), (a(test) + b(test)) / 2, atol=1e-4)
    # partial merging, the paper's size: hidden width m_l + 2 (d_l - m_l), m_l = round(ratio_l d_l)
    part = pleas_merge(a, b, _x(2), ratio=(0.5, 0.3))
    assert part.widths == [6 + 2 * 6, 3 + 2 * 7]
    w1, w2 = part.widths
    assert sum(p.numel() for p in part.model.parameters()) == (6 * w1 + w1) + (w1 * w2 + w2) + (w2 * 3 + 3)
    with pytest.raises(ValueError, match=r"pleas: ratio: expected 2 fractions in \[0, 1\], found \(0.5,\)"):
        pleas_merge(a, b, _x(2), ratio=(0.5,))
    with pytest.raises(ValueError, match="layer 1: expected nn.Linear or an elementwise activation, found LayerNorm"):
        bad = nn.Sequential(nn.Linear(6, 4), nn.LayerNorm(4), nn.Linear(4, 3))
        pleas_merge(bad, copy.deepcopy(bad), _x(2))


@pytest.mark.slow
def test_two_independent_models_merge_far_better_than_weight_averaging():
    g = torch.Generator().manual_seed(5)
    w_true = torch.randn(6, 3, generator=g)

    def target(x):
        return torch.sin(x @ w_true)

    models = []
    for seed in (10, 11):
        m = _mlp(seed, h=(32, 32))
        opt = torch.optim.Adam(m.parameters(), lr=1e-2)
        for xb in _x(seed, n=1024) * 10:
            opt.zero_grad()
            ((m(xb) - target(xb)) ** 2).mean().backward()
            opt.step()
        models.append(m)
    test = torch.cat(_x(99, n=512))

    def mse(m):
        with torch.no_grad():
            return float(((m(test) - target(test)) ** 2).mean())

    avg = copy.deepcopy(models[0])
    with torch.no_grad():
        for p, q in zip(avg.parameters(), models[1].parameters()):
            p.copy_((p + q) / 2)
    res = pleas_merge(models[0], models[1], _x(7, n=1024), ratio=1.0)
    # measured: a 0.184, b 0.171, weight average 0.380, PLeaS 0.185 (test MSE)
    print({"a": mse(models[0]), "b": mse(models[1]), "avg": mse(avg), "pleas": mse(res.model)})
    assert mse(res.model) < 0.5 * mse(avg)
    assert mse(res.model) < 3 * max(mse(models[0]), mse(models[1]))
    # a partial merge (half the units) sits between the full merge and the side-by-side ensemble
    half = pleas_merge(models[0], models[1], _x(7, n=1024), ratio=0.5)
    assert mse(half.model) <= mse(res.model) * 1.05
