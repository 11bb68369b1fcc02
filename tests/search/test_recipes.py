"""Merge-recipe spaces: from the merge configs' declarations; every sample is a recipe
``deltakit merge`` reads; per-layer coefficients land on the right blocks."""
from __future__ import annotations

import optuna
import pytest

from deltakit.merge.recipe import load_recipe
from deltakit.search.recipes import merge_space
from deltakit.search.space import SpaceError

optuna.logging.set_verbosity(optuna.logging.WARNING)


def test_merge_space_knobs_come_from_declarations():
    sp = merge_space(None, ["a", "b"])
    assert "fisher" not in sp.methods and "regmean" not in sp.methods  # they need statistics from data
    ties = {p.name: p for p in sp.methods["ties"].searched()}
    assert set(ties) == {"density", "lam"}
    from deltakit.core.fields import fields_of
    from deltakit.merge._registry import get_merge
    dens = next(f for f in fields_of(get_merge("ties").config) if f.name == "density")
    assert (dens.low, dens.high, dens.low_open, dens.high_open) == (0, 1, False, False)  # declared [0, 1]
    assert (ties["density"].low, ties["density"].high) == (0.0, 1.0)
    assert (ties["lam"].low, ties["lam"].high) == (0.25, 2.0)
    assert {p.name for p in sp.methods["slerp"].searched()} == {"t"}  # eps is a tolerance, not a knob


def test_every_sample_is_a_recipe_deltakit_merge_reads():
    sp = merge_space({"methods": {"ties": {"density": {"low": 0.1, "high": 0.5}}, "slerp": {}, "linear": {}},
                      "layer_weights": [0.0, 1.5]}, ["m0", "m1"], num_layers=3)
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=0))
    seen = set()
    for _ in range(25):
        t = study.ask()
        r = sp.sample(t)
        recipe = load_recipe({**r, "base_model": "base"})
        seen.add(r["method"])
        if r["method"] == "ties":
            assert 0.1 <= r["parameters"]["density"] <= 0.5
            # block 2 of 3 gets exactly the coefficients drawn for layer 2 (the gradient's last point)
            cfg = recipe.config_for("model.layers.2.mlp.up_proj.weight", 2, 3)
            assert cfg.weights == pytest.approx((t.params["weight.0.layer2"], t.params["weight.1.layer2"]))
        if r["method"] == "slerp":
            assert not any(k.startswith("weight.") for k in t.params)  # slerp has no per-model weights
        study.tell(t, 0.0)
    assert seen == {"ties", "slerp", "linear"}


def test_merge_space_errors():
    with pytest.raises(SpaceError, match=r"^merge.methods.fisher: expected one of \["):
        merge_space({"methods": ["fisher"]}, ["a"])
    with pytest.raises(SpaceError, match=r"^merge.layer_weights: expected \[low, high\] with low < high, found 1$"):
        merge_space({"layer_weights": 1}, ["a"], num_layers=2)
