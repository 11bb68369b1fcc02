"""Search spaces come from the configs' declarations; the YAML restricts / extends them."""
from __future__ import annotations

import optuna
import pytest

import deltakit  # noqa: F401  (registers the methods)
from deltakit.core.fields import fields_of
from deltakit.methods.lora import LoraConfig
from deltakit.search.space import SPAN, SpaceError, build_space, derived_range, method_space
from deltakit.search.spec import parse_spec

optuna.logging.set_verbosity(optuna.logging.WARNING)


def _field(cls, name):
    return next(s for s in fields_of(cls) if s.name == name)


def _params(space, method):
    return {p.name: p for p in space.methods[method].params}


def test_lora_r_range_comes_from_its_declaration():
    r = _field(LoraConfig, "r")
    assert (r.low, r.high, r.log, r.default) == (1, None, True, 8)  # what LoraConfig declares
    p = _params(build_space({"methods": ["lora"]}), "lora")
    # log-declared -> searched on a log scale over [default / 8, default * 8], clipped to r >= 1
    assert (p["r"].kind, p["r"].low, p["r"].high, p["r"].log) == ("int", 1, 64, True)
    assert (p["alpha"].kind, p["alpha"].low, p["alpha"].high) == ("float", 2.0, 128.0)
    # undeclared-as-size fields stay at their defaults; 'where to attach' fields are not knobs
    assert p["dropout"].kind == "fixed" and p["dropout"].value == 0.0
    assert "targets" not in p and "layers" not in p


def test_derived_range_respects_open_and_closed_bounds():
    dens = _field(deltakit.get_method("sparse_random").config, "density")  # (0, 1], log, default 0.01
    lo, hi = derived_range(dens)
    assert (lo, hi) == pytest.approx((0.01 / SPAN, 0.01 * SPAN))
    drop = _field(LoraConfig, "dropout")  # [0, 1): opened, its upper bound moves inwards
    lo, hi = derived_range(drop)
    assert lo == 0.0 and hi == pytest.approx(1 - 1e-6)


def test_every_registered_method_gets_a_space_without_a_table():
    space = build_space({"methods": "all"})
    assert set(space.methods) == set(deltakit.list_methods())
    # every searched knob is a log-declared numeric field of that method's own config
    for name, ms in space.methods.items():
        for p in ms.searched():
            spec = _field(deltakit.get_method(name).config, p.name)
            assert spec.log and p.log


def test_conditional_params_only_for_the_chosen_method():
    space = build_space({"methods": {"lora": {}, "houlsby": {}}})
    study = optuna.create_study(directions=["maximize"], sampler=optuna.samplers.RandomSampler(seed=0))
    seen = set()
    for _ in range(20):
        t = study.ask()
        method, settings, training = space.sample(t)
        other = "houlsby" if method == "lora" else "lora"
        assert not any(k.startswith(other + ".") for k in t.params), t.params
        assert {k for k in t.params if k.startswith(method + ".")} == {f"{method}.{k}" for k in settings}
        assert set(training) == {"lr", "steps", "warmup"}
        study.tell(t, 0.0)
        seen.add(method)
    assert seen == {"lora", "houlsby"}


def test_yaml_restricts_fixes_extends_and_drops():
    space = build_space({
        "methods": "all", "drop": [m for m in deltakit.list_methods() if m not in ("lora", "ia3", "houlsby")],
        "fields": {"dropout": [0.0, 0.2]},
        "training": {"lr": [1e-5, 1e-2], "steps": {"low": 10, "high": 40}},
    } | {"methods": {"lora": {"r": [4, 16], "alpha": 32, "init": ["kaiming", "gaussian"]}, "ia3": {},
                     "houlsby": {"non_linearity": "search"}}, "drop": ["ia3"]})
    assert set(space.methods) == {"lora", "houlsby"}
    lora = _params(space, "lora")
    assert (lora["r"].low, lora["r"].high) == (4, 16)
    assert lora["alpha"].kind == "fixed" and lora["alpha"].value == 32.0
    assert lora["init"].choices == ("kaiming", "gaussian")
    assert (lora["dropout"].low, lora["dropout"].high, lora["dropout"].log) == (0.0, 0.2, False)
    assert _params(space, "houlsby")["non_linearity"].choices == ("relu", "gelu", "swish", "tanh")
    tr = {p.name: p for p in space.training.params}
    assert (tr["lr"].low, tr["lr"].high, tr["lr"].log) == (1e-5, 1e-2, True)
    assert (tr["steps"].kind, tr["steps"].low, tr["steps"].high) == ("int", 10, 40)


@pytest.mark.parametrize("doc, message", [
    ({"methods": {"lora": {"r": [0, 8]}}}, "methods.lora.r.low: expected a positive integer, found 0"),
    ({"methods": {"lora": {"rank": 8}}}, "methods.lora.rank: expected a field of lora ("),
    ({"methods": {"lora": {"init": ["kaiming", "xavier"]}}},
     "methods.lora.init[1]: expected one of ['kaiming', 'gaussian', 'orthogonal'], found 'xavier'"),
    ({"methods": {"lora": {"dropout": [0.5, 0.1]}}}, "methods.lora.dropout: expected low <= high, found [0.5, 0.1]"),
    ({"methods": {"houlsby": {"scaling": "search"}}}, "methods.houlsby.scaling: expected [low, high] or {choices"),
    ({"methods": {"nope": {}}}, "methods.nope: expected one of ["),
    ({"methods": ["lora"], "drop": ["lora"]}, "methods: expected at least one method left after drop, found none"),
    ({"training": {"warmup": 0.9}}, "space.training.warmup: expected a number in [0, 0.5], found 0.9"),
])
def test_yaml_errors_are_one_line_naming_field_expected_found(doc, message):
    with pytest.raises(SpaceError) as e:
        build_space({"methods": ["lora"], **doc} if "methods" not in doc else doc)
    assert message in str(e.value) and "\n" not in str(e.value)


def test_spec_errors_name_the_entry():
    with pytest.raises(SpaceError, match=r"^space.objectives: expected distinct names from \['metric', 'params', "
                                         r"'bytes', 'latency'\], found \['metric', 'speed'\]$"):
        parse_spec({"task": "toy", "objectives": ["metric", "speed"]})
    with pytest.raises(SpaceError, match=r"^space.sampler: expected one of .*found 'cmaes'$"):
        parse_spec({"task": "toy", "sampler": "cmaes"})
    with pytest.raises(SpaceError, match=r"^space.task.holdout: expected a number in \(0, 1\), found 1.5$"):
        parse_spec({"task": {"train": "x.tsv", "holdout": 1.5}})


def test_autopeft_preset_over_the_unified_method_with_layer_switches():
    spec = parse_spec({"task": "toy", "preset": "autopeft", "methods": {"unified": {"r": [4, 64]}}})
    space = spec.space(num_layers=4)
    assert list(space.methods) == ["unified"]
    p = _params(space, "unified")
    assert p["insertion"].choices == ("sequential", "parallel")          # serial or parallel adapter
    assert p["prefix_length"].choices == (0, 1, 3, 6, 12, 24, 48)        # 0 = no prefix
    assert (p["r"].low, p["r"].high) == (4, 64)                          # the user's entry wins
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=1))
    t = study.ask()
    _, settings, _ = space.sample(t)
    switches = [t.params[f"unified.layer{i}"] for i in range(4)]
    assert settings["layers"] == tuple(i for i, on in enumerate(switches) if on)
    cfg = deltakit.get_method("unified").config(**{**settings, "layers": settings["layers"] or (0,)})
    assert cfg.insertion == settings["insertion"]


def test_a_fixed_default_is_left_out_of_the_config():
    ms = method_space("lora", LoraConfig, {"r": 8, "alpha": 32})
    study = optuna.create_study()
    settings = ms.sample(study.ask())
    assert settings == {"alpha": 32.0}
