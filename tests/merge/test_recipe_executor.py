"""Recipes (deltakit + mergekit YAML) and the streaming executor's rules."""
from __future__ import annotations

import json

import pytest
import torch
import yaml
from safetensors.torch import save_file

from deltakit.io.files import DeltakitFileError
from deltakit.merge import (MergeConfigError, MergeContext, MergePlan, RecipeError, get_merge, load_recipe,
                            merge_checkpoints, merge_task_vectors, run_recipe)
from deltakit.merge.methods.ties import TiesConfig
from deltakit.taskvec import LazyCheckpoint, TaskVector


def _write(tmp_path, name, sd):
    d = tmp_path / name
    d.mkdir()
    save_file(sd, str(d / "model.safetensors"))
    (d / "config.json").write_text(json.dumps({"num_hidden_layers": 2}))
    return d


def _sds(seed=0):
    g = torch.Generator().manual_seed(seed)
    base = {"model.layers.0.w": torch.randn(4, 3, generator=g), "model.layers.1.w": torch.randn(4, 3, generator=g),
            "model.embed_tokens.weight": torch.randn(6, 3, generator=g), "pos": torch.arange(4)}
    fts = []
    for _ in range(3):
        fts.append({k: (v + torch.randn(v.shape, generator=g) if v.is_floating_point() else v.clone())
                    for k, v in base.items()})
    return base, fts


def test_native_recipe_ties_with_lines_bf16_and_shards(tmp_path):
    base, fts = _sds()
    b = _write(tmp_path, "base", base)
    ds = [_write(tmp_path, f"ft{i}", sd) for i, sd in enumerate(fts)]
    recipe = {"method": "ties", "base_model": "base",
              "models": [{"model": "ft0", "weight": 1.0, "density": 0.5}, "ft1", {"model": "ft2", "weight": 0.5}],
              "parameters": {"density": 0.7, "lam": [0.5, 1.0]}, "lines": {"alpha": 0.5, "beta": 0.5},
              "dtype": "bfloat16", "shard_size": 100}
    path = tmp_path / "r.yaml"
    path.write_text(yaml.safe_dump(recipe))
    out = run_recipe(path, tmp_path / "out", progress=False)
    assert (out / "model.safetensors.index.json").is_file() and (out / "config.json").is_file()
    ck = LazyCheckpoint(out)
    assert torch.equal(ck.get("pos"), base["pos"]) and ck.dtype("pos") == torch.int64
    m = get_merge("ties")
    for n, layer in [("model.layers.0.w", 0), ("model.layers.1.w", 1), ("model.embed_tokens.weight", None)]:
        assert ck.dtype(n) == torch.bfloat16
        t = 0.0 if layer is None else layer  # 2 layers -> t = layer / 1
        lam = 0.5 + 0.5 * t
        cfg = TiesConfig(density=(0.5, 0.7, 0.7), weights=(1.0, 1.0, 0.5), lam=lam)
        x = torch.stack([sd[n] for sd in fts]) - base[n]
        merged = m(x, base[n], cfg)
        f = 0.5 if layer in (0, None) else 1.0  # LiNeS: embeddings and block 0 get alpha, last block alpha+beta
        want = (base[n] + f * (merged - base[n])).to(torch.bfloat16)
        assert torch.equal(ck.get(n), want), n


def test_recipe_errors_name_the_field(tmp_path):
    base, fts = _sds()
    b = str(_write(tmp_path, "base", base))
    f0 = str(_write(tmp_path, "ft0", fts[0]))
    ok = {"method": "ties", "base_model": b, "models": [f0]}
    cases = [
        ({**ok, "methd": 1}, r"recipe.methd: expected one of .*found 'methd'"),
        ({**ok, "method": "tiess"}, r"recipe.method: expected one of .*found 'tiess'"),
        ({**ok, "models": [{"model": f0, "weight": "heavy"}]}, r"recipe.models\[0\].weight: expected a number, found 'heavy'"),
        ({**ok, "models": [{"model": f0, "lam": 1.0}]}, r"recipe.models\[0\].lam: expected a per-model field"),
        ({**ok, "parameters": {"densty": 0.5}}, r"recipe.parameters.densty: expected a field of ties"),
        ({**ok, "parameters": {"sparsify": "mag"}}, r"recipe.parameters.sparsify: expected one of \['none', 'magnitude'"),
        ({**ok, "parameters": {"density": 1.5}}, r"TiesConfig.density: expected a number in \[0, 1\], found 1.5"),
        ({**ok, "dtype": "float8"}, r"recipe.dtype: expected one of .*found 'float8'"),
        ({**ok, "models": []}, r"recipe.models: expected a non-empty list"),
        ({"method": "slerp", "models": [f0]}, r"recipe.base_model: expected a base model for slerp"),
        ({"merge_method": "nuslerp", "models": [{"model": f0}]}, r"recipe.merge_method: expected one of .*found 'nuslerp'"),
        ({"merge_method": "ties", "slices": []}, r"slices/modules are not supported"),
        ({"merge_method": "ties", "base_model": b, "models": [{"model": f0, "parameters": {"densiti": 1}}]},
         r"recipe.models\[0\].parameters.densiti: expected one of"),
    ]
    for d, pattern in cases:
        with pytest.raises(RecipeError, match=pattern):
            load_recipe(d)
    (tmp_path / "bad.yaml").write_text("method: [unclosed")
    with pytest.raises(RecipeError, match="not valid YAML"):
        load_recipe(tmp_path / "bad.yaml")


def test_executor_rules(tmp_path):
    base, fts = _sds()
    plan = MergePlan(method=get_merge("task_arithmetic"), config_for=lambda n, l, L: get_merge("task_arithmetic").config())
    # differing non-float tensors are an error
    bad = dict(fts[0], pos=torch.arange(4) + 1)
    with pytest.raises(DeltakitFileError, match="pos: non-float tensor differs"):
        merge_checkpoints([bad], tmp_path / "o1", plan, base=base, progress=False)
    assert not (tmp_path / "o1").exists()  # atomic: nothing left behind
    # a missing tensor is an error unless missing="base"
    partial = {k: v for k, v in fts[0].items() if k != "model.layers.1.w"}
    with pytest.raises(DeltakitFileError, match="model.layers.1.w: expected it in models\\[0\\]"):
        merge_checkpoints([partial, fts[1]], tmp_path / "o2", plan, base=base, progress=False)
    plan.missing = "base"
    out = merge_checkpoints([partial, fts[1]], tmp_path / "o2", plan, base=base, progress=False)
    got = LazyCheckpoint(out).get("model.layers.1.w")
    assert torch.allclose(got, fts[1]["model.layers.1.w"], atol=1e-6)  # base + 0 + (ft1 - base)
    # extra tensors and shape mismatches are errors
    with pytest.raises(DeltakitFileError, match="tensor 'extra' is not in the base"):
        merge_checkpoints([dict(fts[0], extra=torch.zeros(1))], tmp_path / "o3", plan, base=base, progress=False)
    with pytest.raises(DeltakitFileError, match=r"model.layers.0.w: expected shape \(4, 3\)"):
        merge_checkpoints([dict(fts[0], **{"model.layers.0.w": torch.zeros(3, 3)})], tmp_path / "o4", plan,
                          base=base, progress=False)


def test_merge_task_vectors_lazy():
    base, fts = _sds()
    tvs = [TaskVector.from_state_dicts(ft, base) for ft in fts]
    merged = merge_task_vectors("ties", tvs, TiesConfig(density=0.5))
    n = "model.layers.0.w"
    x = torch.stack([tv[n] for tv in tvs])
    assert torch.equal(merged[n], get_merge("ties")(x, torch.zeros(4, 3), TiesConfig(density=0.5), MergeContext()))
    assert "pos" not in merged  # integer tensors are not deltas


def test_cli_merge_subcommand(tmp_path, capsys):
    import argparse

    from deltakit.cli import merge as cli_merge

    base, fts = _sds()
    b = _write(tmp_path, "base", base)
    for i, sd in enumerate(fts):
        _write(tmp_path, f"ft{i}", sd)
    (tmp_path / "r.yaml").write_text(yaml.safe_dump({"method": "task_arithmetic", "base_model": "base",
                                                     "models": ["ft0", "ft1"], "parameters": {"lam": 0.5}}))
    p = argparse.ArgumentParser()
    cli_merge.add_parser(p.add_subparsers(dest="command"))
    args = p.parse_args(["merge", str(tmp_path / "r.yaml"), "-o", str(tmp_path / "out"), "--no-progress"])
    assert args.func(args) == 0
    got = LazyCheckpoint(tmp_path / "out").get("model.layers.0.w")
    n = "model.layers.0.w"
    assert torch.allclose(got, base[n] + 0.5 * (fts[0][n] - base[n] + fts[1][n] - base[n]), atol=1e-6)


def test_fsync_is_off_by_default_and_on_with_fsync(tmp_path, monkeypatch):
    import argparse
    import os

    import deltakit.io.tensors as writer
    from deltakit.cli import merge as cli_merge

    calls = []
    real = os.fsync
    monkeypatch.setattr(writer.os, "fsync", lambda fd: (calls.append(fd), real(fd)))
    base, fts = _sds()
    _write(tmp_path, "base", base)
    for i, sd in enumerate(fts):
        _write(tmp_path, f"ft{i}", sd)
    (tmp_path / "r.yaml").write_text(yaml.safe_dump({"method": "linear", "models": ["ft0", "ft1"]}))
    p = argparse.ArgumentParser()
    cli_merge.add_parser(p.add_subparsers(dest="command"))
    for flags, want in (([], 0), (["--no-fsync"], 0), (["--fsync"], 1)):
        calls.clear()
        out = tmp_path / f"out{'-'.join(flags)}"
        args = p.parse_args(["merge", str(tmp_path / "r.yaml"), "-o", str(out), "--no-progress", *flags])
        assert args.func(args) == 0
        assert len(calls) == want  # one shard
        n = "model.layers.0.w"
        assert torch.allclose(LazyCheckpoint(out).get(n), (fts[0][n] + fts[1][n]) / 2, atol=1e-6)


def test_non_finite_result_aborts_the_write(tmp_path):
    base, fts = _sds()
    bad = dict(fts[0], **{"model.layers.1.w": torch.full((4, 3), float("nan"))})
    plan = MergePlan(method=get_merge("linear"), config_for=lambda n, l, L: get_merge("linear").config())
    with pytest.raises(FloatingPointError, match="model.layers.1.w: merge produced non-finite values"):
        merge_checkpoints([bad, fts[1]], tmp_path / "out", plan, progress=False)
    assert not (tmp_path / "out").exists()


def test_recipe_stats_files_feed_fisher(tmp_path):
    a = _write(tmp_path, "a", {"w": torch.tensor([1.0, 1.0])})
    b = _write(tmp_path, "b", {"w": torch.tensor([3.0, 3.0])})
    save_file({"w": torch.tensor([1.0, 3.0])}, str(tmp_path / "fa.safetensors"))
    save_file({"w": torch.tensor([3.0, 1.0])}, str(tmp_path / "fb.safetensors"))
    r = {"method": "fisher", "models": [str(a), str(b)], "parameters": {"fisher_floor": 0.0},
         "stats": {"fisher": [str(tmp_path / "fa.safetensors"), str(tmp_path / "fb.safetensors")]}}
    out = run_recipe(r, tmp_path / "out", progress=False)
    assert torch.allclose(LazyCheckpoint(out).get("w"), torch.tensor([2.5, 1.5]))
    with pytest.raises(RecipeError, match="recipe.stats.fisher: expected per-model statistic files"):
        load_recipe({k: v for k, v in r.items() if k != "stats"})


@pytest.mark.parametrize("method,values", [
    ("linear", {"weights": (0.5, 0.3, 0.2)}), ("linear", {"weights": (1.0, 2.0, -0.5), "normalize": False}),
    ("task_arithmetic", {"lam": 0.7, "weights": (1.0, 0.5, 2.0)}),
    ("task_arithmetic", {"normalize": True, "weights": (1.0, 0.5, 2.0)}),
    ("dare_linear", {"density": 1.0}), ("ties", {"density": 1.0, "consensus": "none"}),
])
@pytest.mark.parametrize("storage", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("chunk", [0, 5, 1 << 20])
def test_linear_form_fast_path_equals_the_method(tmp_path, monkeypatch, method, values, storage, chunk):
    """The executor sums a linear-form method model by model from the files; the result must
    be the method function's on the stacked inputs (files in fp32 and bf16, one model missing
    a tensor, LiNeS on top), whether it sums whole tensors (chunk 0) or chunks (5 elements:
    uneven chunks of the 12- and 18-element tensors)."""
    from deltakit.merge import build_config, executor
    from deltakit.merge._layers import layer_index, lines_factor
    from deltakit.merge.executor import merge_tensors

    monkeypatch.setattr(executor, "LINEAR_CHUNK", chunk)

    m = get_merge(method)
    cfg = build_config(m, values)
    assert m.linear_form is not None and m.linear_form(cfg, 3) is not None
    base, fts = _sds(1)
    base = {k: v.to(storage) if v.is_floating_point() else v for k, v in base.items()}
    fts = [{k: v.to(storage) if v.is_floating_point() else v for k, v in sd.items()} for sd in fts]
    del fts[2]["model.layers.1.w"]  # contributes the base (a zero task vector)
    dirs = [_write(tmp_path, f"ft{i}", sd) for i, sd in enumerate(fts)]
    bdir = _write(tmp_path, "base", base)
    # fp32 output: compare the fp32 sums themselves, not their (boundary-sensitive) bf16 rounding
    plan = MergePlan(method=m, config_for=lambda n, l, L: cfg, missing="base", lines=(0.5, 1.0),
                     out_dtype=torch.float32)
    out = LazyCheckpoint(merge_checkpoints(dirs, tmp_path / "out", plan, base=bdir, progress=False))
    for n in ("model.layers.0.w", "model.layers.1.w", "model.embed_tokens.weight"):
        xs = [sd.get(n, base[n]) for sd in fts]
        want = merge_tensors(m, xs, base[n], cfg, MergeContext(name=n))
        f = lines_factor(n, layer_index(n), 2, *plan.lines)
        want = base[n].float() + f * (want - base[n].float())
        torch.testing.assert_close(out.get(n), want, rtol=0, atol=1e-6)
    assert torch.equal(out.get("pos"), base["pos"])


@pytest.mark.parametrize("method,values", [
    ("linear", {"weights": (0.5, 0.3, 0.2)}), ("task_arithmetic", {"lam": 0.7, "weights": (1.0, 0.5, 2.0)}),
    ("ties", {"density": 1.0, "consensus": "none"}),
])
def test_task_vectors_take_the_same_linear_fast_path(monkeypatch, method, values):
    """merge_task_vectors sums a linear-form method through the executor's one linear_sum (no
    (K, *shape) stack; a low-rank entry made dense as it is read): equal to the method on the
    stacked dense task vectors, and bit for bit whatever the chunk size."""
    from deltakit.merge import _job, build_config, executor
    from deltakit.taskvec import LowRank

    calls = []
    real = _job.linear_sum
    monkeypatch.setattr(_job, "linear_sum", lambda *a, **k: calls.append(1) or real(*a, **k))
    base, fts = _sds(2)
    tvs = [TaskVector.from_state_dicts(ft, base) for ft in fts]
    g = torch.Generator().manual_seed(5)
    lr = LowRank(torch.randn(4, 2, generator=g), torch.randn(2, 3, generator=g), 0.5)
    tvs[1] = TaskVector.from_mapping({**{n: tvs[1].get(n) for n in tvs[1].keys()}, "model.layers.0.w": lr})
    m, cfg = get_merge(method), build_config(method, values)
    got = {}
    for chunk in (0, 5):
        monkeypatch.setattr(executor, "LINEAR_CHUNK", chunk)
        merged = merge_task_vectors(method, tvs, cfg)
        got[chunk] = {n: merged.get(n) for n in merged.keys()}
    assert len(calls) == 2 * len(got[0]) == 6  # every entry, both chunk sizes, through linear_sum
    for n, t in got[0].items():
        assert torch.equal(t, got[5][n]), n
        x = torch.stack([tv.dense(n) for tv in tvs])
        torch.testing.assert_close(t, m(x, torch.zeros(x.shape[1:]), cfg), rtol=0, atol=1e-6)
    with pytest.raises(MergeConfigError, match="ties: expected a TiesConfig, found LinearConfig"):
        merge_task_vectors("ties", tvs, build_config("linear", {}))


def test_magnitude_sort_is_the_argsort_set_without_ambiguous_ties():
    from deltakit.merge import SPARSIFY

    g = torch.Generator().manual_seed(3)
    for x in (torch.randn(50_001, generator=g),  # no ties: the O(n) path
              torch.cat([torch.zeros(30_000), torch.randn(20_000, generator=g)]),  # zeros below the threshold
              torch.randint(-3, 4, (40_000,), generator=g).float()):  # ambiguous ties: the sort decides
        for density in (0.1, 0.5, 0.9):
            k = max(1, int(density * x.numel()))
            want = torch.zeros_like(x, dtype=torch.bool)
            want[torch.argsort(x.abs(), descending=True)[:k]] = True
            assert torch.equal(SPARSIFY["magnitude_sort"](x, density, None, 0.0, 0.0), want)


def test_mergekit_ties_tie_order_follows_the_recipe_dtype(tmp_path):
    """fp32 mergekit TIES recipes reproduce mergekit's argsort tie order; half-precision ones
    (where mergekit ranks rounded task vectors) use the O(n) trim."""
    base, fts = _sds()
    dirs = [_write(tmp_path, f"m{i}", sd) for i, sd in enumerate([base, *fts])]
    rec = {"merge_method": "ties", "base_model": str(dirs[0]),
           "models": [{"model": str(p), "parameters": {"weight": 1.0, "density": 0.5}} for p in dirs[1:]]}
    assert load_recipe(dict(rec, dtype="float32")).shared["sparsify"] == "magnitude_sort"
    assert load_recipe(rec).shared["sparsify"] == "magnitude_sort"
    assert load_recipe(dict(rec, dtype="bfloat16")).shared["sparsify"] == "magnitude"
