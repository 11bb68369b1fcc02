"""LCSC (https://arxiv.org/abs/2404.02241): the affine combination by hand, the sum-to-one rule,
the CMA-ES search (Optuna) recovering a known combination, recipe / CLI."""
from __future__ import annotations

import json

import optuna
import pytest
import torch
import yaml
from safetensors.torch import save_file

from deltakit.merge import MergeConfigError, get_merge, lcsc_search, load_recipe, run_recipe
from deltakit.merge.methods.lcsc import LcscConfig
from deltakit.taskvec import LazyCheckpoint

T = torch.tensor


def test_lcsc_on_paper():
    m = get_merge("lcsc")
    x = T([[1.0, 2.0], [3.0, 6.0], [5.0, -2.0]])
    # alpha = (-0.5, 1, 0.5): -0.5 [1, 2] + [3, 6] + 0.5 [5, -2] = [5, 4]
    assert torch.equal(m(x, torch.zeros(2), LcscConfig(weights=(-0.5, 1.0, 0.5))), T([5.0, 4.0]))
    assert torch.allclose(m(x, torch.zeros(2), LcscConfig()), T([3.0, 2.0]))  # uniform average
    with pytest.raises(MergeConfigError, match=r"lcsc: weights: expected a sum of 1, found 1.5"):
        m(x, torch.zeros(2), LcscConfig(weights=(0.5, 0.5, 0.5)))
    with pytest.raises(MergeConfigError, match="weights: expected 3 values"):
        m(x, torch.zeros(2), LcscConfig(weights=(0.5, 0.5)))


def _run(seed=0, k=4):
    """K checkpoints of a 'run' and a target combination with a negative alpha (sum 1)."""
    g = torch.Generator().manual_seed(seed)
    cks = [{"w": torch.randn(5, 3, generator=g), "b": torch.randn(3, generator=g), "step": T(i)} for i in range(k)]
    alpha = [-0.3, 0.2, 0.5, 0.6][:k]
    target = {n: sum(a * ck[n] for a, ck in zip(alpha, cks)) for n in ("w", "b")}
    return cks, alpha, target


def test_search_recovers_a_known_combination_through_optuna_cmaes():
    cks, alpha, target = _run()

    def objective(sd):
        return -sum(float(((sd[n] - target[n]) ** 2).sum()) for n in target)

    study = optuna.create_study(direction="maximize", sampler=optuna.samplers.CmaEsSampler(seed=0))
    res = lcsc_search(cks, objective, n_trials=150, seed=0, study=study)
    assert len(study.trials) == 150 and isinstance(study.sampler, optuna.samplers.CmaEsSampler)
    assert len(study.best_params) == 3  # K - 1 free alphas: the last is 1 - their sum
    uniform = objective({n: sum(ck[n] for ck in cks) / 4 for n in target})
    assert res.history[0] == pytest.approx(uniform, rel=1e-5)  # the first point is the uniform average
    assert res.best_value == max(res.history) and res.best_value > -0.05 > uniform
    assert sum(res.coefficients) == pytest.approx(1.0)
    assert all(abs(a - b) < 0.1 for a, b in zip(res.coefficients, alpha)), res.coefficients
    sd = res.state_dict(cks)
    assert objective(sd) == pytest.approx(res.best_value, abs=1e-4) and torch.equal(sd["step"], T(3))
    # the found alphas through the registered method are the same weights
    x = torch.stack([ck["w"] for ck in cks])
    got = get_merge("lcsc")(x, torch.zeros(5, 3), LcscConfig(weights=tuple(res.recipe_parameters()["weights"])))
    assert torch.allclose(got, sd["w"], atol=1e-5)
    with pytest.raises(ValueError, match="lcsc_search: expected at least 2 checkpoints, found 1"):
        lcsc_search(cks[:1], objective)
    bad = [dict(cks[0], w=torch.zeros(2)), cks[1]]
    with pytest.raises(ValueError, match=r"lcsc_search: checkpoint 0: expected 'w' shaped \(5, 3\)"):
        lcsc_search(bad, objective)


def _write(d, sd):
    d.mkdir()
    save_file(sd, str(d / "model.safetensors"))
    (d / "config.json").write_text(json.dumps({"num_hidden_layers": 1}))


def test_recipe_applies_searched_weights(tmp_path):
    cks, alpha, target = _run(seed=3, k=3)
    alpha = [-0.5, 0.5, 1.0]
    for i, ck in enumerate(cks):
        _write(tmp_path / f"ck{i}", {"model.layers.0.w": ck["w"], "model.norm.weight": ck["b"]})
    r = {"method": "lcsc", "models": [{"model": f"ck{i}", "weight": a} for i, a in enumerate(alpha)]}
    (tmp_path / "r.yaml").write_text(yaml.safe_dump(r))
    out = LazyCheckpoint(run_recipe(load_recipe(tmp_path / "r.yaml"), tmp_path / "out", progress=False))
    want = sum(a * ck["w"] for a, ck in zip(alpha, cks))
    assert torch.allclose(out.get("model.layers.0.w"), want, atol=1e-6)
