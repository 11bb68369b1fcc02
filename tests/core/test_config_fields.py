"""Config fields are declared once (type, range / choices, doc) and everyone reads that.

Every registered PEFT method's and merge method's config declares every field; a value
outside the declaration is a one-line ConfigError naming field, range and value; the
CLI's ``--set`` and YAML recipes coerce through the one function in ``core/fields.py``.
"""
from __future__ import annotations

import dataclasses
import typing

import pytest

import deltakit as dk
from deltakit.core import fields as F
from deltakit.core.fields import ConfigError, FieldSpec, coerce, declared, fields_of
from deltakit.core.registry import methods
from deltakit.merge import build_config, list_merges
from deltakit.merge.recipe import per_model_fields

CONFIGS = sorted({s.config for s in methods().values()} | {m.config for m in list_merges().values()},
                 key=lambda c: c.__name__)


@pytest.mark.parametrize("cls", CONFIGS, ids=lambda c: c.__name__)
def test_every_field_is_declared_with_a_doc(cls):
    for f in dataclasses.fields(cls):
        assert declared(cls, f.name), f"{cls.__name__}.{f.name} is not declared with knob(...)"
    for spec in fields_of(cls):
        assert spec.doc.strip(), f"{cls.__name__}.{spec.name} has no doc"
        if spec.item_type in (int, float):
            assert spec.choices is None
        if typing.get_origin(spec.type) is typing.Literal:
            assert spec.choices == typing.get_args(spec.type)
    cls()   # the defaults satisfy the declaration


def test_fields_of_reads_the_declaration():
    r = next(s for s in fields_of(dk.LoraConfig) if s.name == "r")
    assert r == FieldSpec("r", int, 8, low=1, high=None, choices=None, log=True, doc="rank of the update")
    init = next(s for s in fields_of(dk.LoraConfig) if s.name == "init")
    assert init.choices == ("kaiming", "gaussian", "orthogonal") and init.default == "kaiming"
    drop = next(s for s in fields_of(dk.LoraConfig) if s.name == "dropout")
    assert (drop.low, drop.high, drop.low_open, drop.high_open) == (0, 1, False, True)


def test_a_subclass_that_changes_a_default_inherits_the_declaration():
    from deltakit.merge.methods.ties import TiesConfig
    from deltakit.methods.dept import DeptConfig
    d = next(s for s in fields_of(TiesConfig) if s.name == "density")
    assert (d.default, d.low, d.high, d.per_model) == (0.2, 0, 1, True)
    n = next(s for s in fields_of(DeptConfig) if s.name == "num_virtual_tokens")
    assert (n.default, n.low) == (60, 1)
    with pytest.raises(ConfigError, match=r"^DeptConfig.num_virtual_tokens: expected a positive integer, found 0$"):
        DeptConfig(num_virtual_tokens=0)


def _outside(spec: FieldSpec):
    """A value just outside the declared range (below the low bound, else above the high one)."""
    if spec.low is not None:
        v = spec.low if spec.low_open else spec.low - 1
    else:
        v = spec.high if spec.high_open else spec.high + 1
    v = int(v) if spec.item_type is int else float(v)
    only_tuple = all(typing.get_origin(a) is tuple for a in F._arms(spec.type) if a is not type(None))
    return ((v,), f"{spec.name}[0]") if only_tuple else (v, spec.name)


BOUNDED = [(cls, s) for cls in CONFIGS for s in fields_of(cls) if s.low is not None or s.high is not None]


@pytest.mark.parametrize("cls,spec", BOUNDED, ids=lambda x: getattr(x, "__name__", getattr(x, "name", "")))
def test_out_of_range_is_one_line_naming_field_range_and_value(cls, spec):
    value, where = _outside(spec)
    shown = value[0] if isinstance(value, tuple) else value
    with pytest.raises(ConfigError) as e:
        cls(**{spec.name: value})
    assert str(e.value) == f"{cls.__name__}.{where}: expected {spec.describe()}, found {shown!r}"


@pytest.mark.parametrize("make,message", [
    (lambda: dk.LoraConfig(r=0), "LoraConfig.r: expected a positive integer, found 0"),
    (lambda: dk.LoraConfig(dropout=1.0), "LoraConfig.dropout: expected a number in [0, 1), found 1.0"),
    (lambda: dk.LoraConfig(alpha=0), "LoraConfig.alpha: expected a positive number, found 0"),
    (lambda: dk.LoraConfig(r="8"), "LoraConfig.r: expected an integer, found '8'"),
    (lambda: dk.LoraConfig(r=8.0), "LoraConfig.r: expected an integer, found 8.0"),
    (lambda: dk.LoraConfig(r=True), "LoraConfig.r: expected an integer, found True"),
    (lambda: dk.LoraConfig(init="xavier"),
     "LoraConfig.init: expected one of ['kaiming', 'gaussian', 'orthogonal'], found 'xavier'"),
    (lambda: dk.LoraConfig(layers=(0, -2)), "LoraConfig.layers[1]: expected an integer >= 0, found -2"),
    (lambda: dk.get_method("adalora").config(beta1=1.0), "AdaLoraConfig.beta1: expected a number in (0, 1), found 1.0"),
    (lambda: dk.get_method("lokr").config(factor=-2), "LokrConfig.factor: expected an integer >= -1, found -2"),
    (lambda: dk.get_method("pissa").config(svd_niter=-1), "PissaConfig.svd_niter: expected an integer >= 0, found -1"),
    (lambda: build_config("ties", {}).__class__(density=(0.5, 1.5)),
     "TiesConfig.density[1]: expected a number in [0, 1], found 1.5"),
    (lambda: build_config("slerp", {}).__class__(t=-0.1), "SlerpConfig.t: expected a number in [0, 1], found -0.1"),
])
def test_hand_written_messages(make, message):
    with pytest.raises(ConfigError) as e:
        make()
    assert str(e.value) == message


def test_cross_field_checks_stay_in_validate():
    with pytest.raises(ConfigError, match="target_r: expected at most init_r = 4, found 8"):
        dk.get_method("adalora").config(init_r=4, target_r=8)
    with pytest.raises(ConfigError, match="factor: expected -1 or a positive integer, found 0"):
        dk.get_method("lokr").config(factor=0)
    with pytest.raises(ConfigError, match="CABSConfig.n: expected at most m=4, found 5"):
        build_config("cabs", {"n": 5})


@pytest.mark.parametrize("raw,tp,want", [
    ("8", int, 8), (" 8 ", int, 8), ("0.5", float, 0.5), ("3", float, 3.0), (3, float, 3.0),
    ("a,b", tuple[str, ...], ("a", "b")), ("a, b,", tuple[str, ...], ("a", "b")),
    ("1,2", tuple[int, ...] | None, (1, 2)), ("none", int | None, None), ("NULL", tuple[str, ...] | None, None),
    (None, float | None, None), ("true", bool, True), ("no", bool, False), (False, bool, False),
    ("0.5", float | tuple[float, ...], 0.5), ("0.5,0.3", float | tuple[float, ...], (0.5, 0.3)),
    ([1, 0.5], tuple[float, ...] | None, (1.0, 0.5)), ("kaiming", typing.Literal["kaiming", "gaussian"], "kaiming"),
    ("2", typing.Literal[1, 2], 2), ("x", str, "x"),
])
def test_coerce(raw, tp, want):
    got = coerce(raw, tp, "where")
    assert got == want and type(got) is type(want)


@pytest.mark.parametrize("raw,tp,message", [
    ("abc", int, "where: expected an integer, found 'abc'"),
    (1.5, int, "where: expected an integer, found 1.5"),
    (True, float, "where: expected a number, found True"),
    ("maybe", bool, "where: expected true/false, found 'maybe'"),
    ("none", int, "where: expected an integer, found 'none'"),
    ("a,b", tuple[int, ...], "where[0]: expected an integer, found 'a'"),
    ("x", float | tuple[float, ...], "where: expected a number or a list of a number, found 'x'"),
    ("xavier", typing.Literal["kaiming", "gaussian"], "where: expected one of ['kaiming', 'gaussian'], found 'xavier'"),
    (3, str, "where: expected a string, found 3"),
])
def test_coerce_errors_are_one_line(raw, tp, message):
    with pytest.raises(ConfigError) as e:
        coerce(raw, tp, "where")
    assert str(e.value) == message


def test_cli_set_and_yaml_go_through_the_one_coercion(monkeypatch):
    from deltakit.cli.commands import parse_settings
    calls = []
    real = F.coerce

    def spy(value, tp, where):
        calls.append(where)
        return real(value, tp, where)

    monkeypatch.setattr(F, "coerce", spy)
    got = parse_settings(dk.LoraConfig, ["r=8", "targets=query,value", "layers=none", "use_rslora=yes"])
    assert got == {"r": 8, "targets": ("query", "value"), "layers": None, "use_rslora": True}
    fields_seen = lambda: sorted({c.split("[")[0] for c in calls})  # noqa: E731  (tuples recurse per item)
    assert fields_seen() == ["--set layers", "--set r", "--set targets", "--set use_rslora"]
    calls.clear()
    cfg = build_config("ties", {"density": "0.5,0.3", "weights": [1, 2], "seed": "none"})
    assert (cfg.density, cfg.weights, cfg.seed) == ((0.5, 0.3), (1.0, 2.0), None)
    assert fields_seen() == ["parameters.density", "parameters.seed", "parameters.weights"]
    with pytest.raises(ConfigError, match=r"^--set r: expected an integer, found 'eight'$"):
        parse_settings(dk.LoraConfig, ["r=eight"])
    with pytest.raises(ConfigError, match=r"^parameters.lam: expected a number, found 'big'$"):
        build_config("ties", {"lam": "big"})


def test_recipes_read_per_model_fields_from_the_declaration(tmp_path):
    from deltakit.merge.methods.cabs import CABSConfig
    from deltakit.merge.methods.dare import DarexQConfig
    from deltakit.merge.methods.ties import TiesConfig
    from deltakit.merge.recipe import load_recipe
    assert per_model_fields(TiesConfig) == ["weights", "density", "gamma", "epsilon", "q"]
    assert per_model_fields(DarexQConfig) == ["weights", "density", "gamma", "epsilon"]   # q: one value here
    assert per_model_fields(CABSConfig) == ["weights", "order"]
    r = load_recipe({"method": "ties", "base_model": "b", "models": [
        {"model": "m0", "weight": "0.5", "density": 0.3}, {"model": "m1", "weight": 2}]})
    cfg = r.config_for("model.layers.0.q_proj.weight", 0, 2)
    assert (cfg.weights, cfg.density) == ((0.5, 2.0), (0.3, 0.2))
