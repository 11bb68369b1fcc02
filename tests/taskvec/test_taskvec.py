"""TaskVector, LazyCheckpoint, LowRank and the streaming writer."""
from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from deltakit.io.files import DeltakitFileError
from deltakit.taskvec import LazyCheckpoint, LowRank, PlannedTensor, TaskVector, write_checkpoint


def _sd(seed: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {"a.weight": torch.randn(4, 3, generator=g), "a.bias": torch.randn(4, generator=g),
            "b.weight": torch.randn(2, 4, generator=g).to(torch.bfloat16),
            "pos_ids": torch.arange(5)}


def _save_dir(tmp_path, name, sd, sharded=False):
    d = tmp_path / name
    d.mkdir()
    if not sharded:
        save_file(sd, str(d / "model.safetensors"))
    else:
        keys = sorted(sd)
        parts = [keys[:2], keys[2:]]
        wm = {}
        for i, ks in enumerate(parts):
            fn = f"model-{i + 1:05d}-of-00002.safetensors"
            save_file({k: sd[k] for k in ks}, str(d / fn))
            wm.update({k: fn for k in ks})
        (d / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": wm}))
    (d / "config.json").write_text("{}")
    return d


@pytest.mark.parametrize("sharded", [False, True])
def test_lazy_checkpoint_matches_safetensors(tmp_path, sharded):
    sd = _sd(0)
    d = _save_dir(tmp_path, "m", sd, sharded)
    ck = LazyCheckpoint(d)
    assert sorted(ck.keys()) == sorted(sd)
    for k, v in sd.items():
        assert ck.shape(k) == tuple(v.shape) and ck.dtype(k) == v.dtype
        assert torch.equal(ck.get(k), v)
    assert ck.get("a.weight", torch.float64).dtype == torch.float64


def test_mapped_views_equal_reads_and_never_write_the_file(tmp_path):
    """Zero-copy views (what the streaming sum reads) at page-unaligned offsets, several
    dtypes, a scalar and an empty tensor; writing into a view leaves the file untouched."""
    sd = {**_sd(1), "big": torch.arange(3001, dtype=torch.float32), "half": torch.randn(7, 5).half(),
          "scalar": torch.tensor(2.5), "empty": torch.zeros(0, 3)}
    d = _save_dir(tmp_path, "m", sd)
    ck = LazyCheckpoint(d)
    assert any(ck.info(k).start % 4096 for k in sd)  # the page-offset path is exercised
    for k, v in sd.items():
        view = ck.mapped(k)
        assert view.dtype == v.dtype and torch.equal(view, v), k
    view = ck.mapped("big")
    view.fill_(-1.0)
    assert torch.equal(LazyCheckpoint(d).get("big"), sd["big"])
    assert torch.equal(ck.mapped("big"), sd["big"])


def test_lazy_checkpoint_errors(tmp_path):
    with pytest.raises(DeltakitFileError, match="expected a checkpoint directory"):
        LazyCheckpoint(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(DeltakitFileError, match="expected model.safetensors"):
        LazyCheckpoint(tmp_path / "empty")
    d = _save_dir(tmp_path, "m", _sd(0))
    f = d / "model.safetensors"
    f.write_bytes(f.read_bytes()[:-10])  # truncated
    with pytest.raises(DeltakitFileError, match="truncated"):
        LazyCheckpoint(d)


@pytest.mark.parametrize("shard_bytes", [1 << 30, 40])
def test_writer_is_readable_by_safetensors(tmp_path, shard_bytes):
    sd = _sd(1)
    plan = [PlannedTensor(k, tuple(v.shape), v.dtype) for k, v in sd.items()]
    out = write_checkpoint(tmp_path / "out", plan, lambda it: sd[it.name], max_shard_bytes=shard_bytes)
    files = sorted(p.name for p in out.glob("*.safetensors"))
    if shard_bytes > 1000:
        assert files == ["model.safetensors"]
    else:
        assert len(files) > 1 and (out / "model.safetensors.index.json").is_file()
    got = {}
    for f in files:
        got.update(load_file(str(out / f)))
    assert got.keys() == sd.keys() and all(torch.equal(got[k], sd[k]) for k in sd)
    assert {k: v for k, v in ((k, LazyCheckpoint(out).get(k)) for k in sd)}.keys() == sd.keys()


@pytest.mark.parametrize("fsync", [True, False])
def test_writer_starts_writeback_of_exactly_each_tensors_bytes(tmp_path, monkeypatch, fsync):
    """With fsync on, the disk write of each tensor is started as soon as it is written (the
    hint's ranges are the tensors' byte ranges in the file); with fsync off, never."""
    from deltakit.io import tensors as _writer

    calls: list[tuple[int, int]] = []
    monkeypatch.setattr(_writer, "_sync_file_range", lambda: lambda fd, off, n: calls.append((off, n)))
    sd = _sd(2)
    plan = [PlannedTensor(k, tuple(v.shape), v.dtype) for k, v in sd.items()]
    out = write_checkpoint(tmp_path / "out", plan, lambda it: sd[it.name], fsync=fsync)
    ck = LazyCheckpoint(out)
    want = sorted((ck.info(k).start, ck.info(k).nbytes) for k in sd)
    assert sorted(calls) == (want if fsync else [])


def test_writer_rejects_wrong_shape_and_leaves_nothing(tmp_path):
    plan = [PlannedTensor("x", (2,), torch.float32)]
    with pytest.raises(DeltakitFileError, match=r"expected \(2,\) torch.float32, found \(3,\)"):
        write_checkpoint(tmp_path / "out", plan, lambda it: torch.zeros(3))
    assert not (tmp_path / "out").exists()


def test_from_checkpoints_and_state_dicts_agree(tmp_path):
    base, ft = _sd(0), _sd(1)
    tv_files = TaskVector.from_checkpoints(_save_dir(tmp_path, "ft", ft, True), _save_dir(tmp_path, "b", base))
    tv_mem = TaskVector.from_state_dicts(ft, base)
    assert sorted(tv_files.keys()) == sorted(tv_mem.keys()) == ["a.bias", "a.weight", "b.weight"]  # int skipped
    for k in tv_mem:
        want = ft[k].float() - base[k].float()
        assert torch.equal(tv_files[k], want) and torch.equal(tv_mem[k], want)


def test_shape_mismatch_is_one_line_error():
    base, ft = _sd(0), _sd(1)
    ft["a.weight"] = torch.zeros(5, 3)
    with pytest.raises(DeltakitFileError, match=r"a.weight: expected fine-tuned shape \(4, 3\).*found \(5, 3\)"):
        TaskVector.from_state_dicts(ft, base)


def test_arithmetic_is_lazy_and_correct():
    calls = []
    base = {"w": torch.zeros(2, 2)}
    t1 = TaskVector.from_mapping({"w": lambda: calls.append(1) or torch.ones(2, 2)})
    t2 = TaskVector.from_mapping({"w": torch.full((2, 2), 3.0), "v": torch.ones(1)})
    expr = 2 * t1 - t2 / 3 + (-t1)
    assert calls == []  # nothing computed yet
    # 2*1 - 3/3 - 1 = 0 ; v: -1/3 (missing name in t1 is a zero delta)
    assert torch.allclose(expr["w"], torch.zeros(2, 2))
    assert torch.allclose(expr["v"], torch.tensor([-1 / 3]))
    assert len(calls) == 2
    assert torch.equal(sum([t1, t1])["w"], torch.full((2, 2), 2.0))
    assert torch.equal(t1.apply(base, scale=0.5)["w"], torch.full((2, 2), 0.5))
    assert torch.equal(base["w"], torch.zeros(2, 2))  # state dict not mutated


def test_lowrank_sum_stays_lowrank_and_exact():
    g = torch.Generator().manual_seed(0)
    d1 = LowRank(torch.randn(5, 2, generator=g), torch.randn(2, 3, generator=g), 0.5)
    d2 = LowRank(torch.randn(5, 1, generator=g), torch.randn(1, 3, generator=g), 2.0)
    s = d1 + d2
    assert isinstance(s, LowRank) and s.rank == 3
    assert torch.allclose(s.dense(), d1.dense() + d2.dense(), atol=1e-6)
    assert abs(s.norm() - float(s.dense().norm())) < 1e-5
    tv = TaskVector.from_mapping({"w": d1}) + TaskVector.from_mapping({"w": d2})
    assert isinstance(tv.get("w"), LowRank)
    conv = LowRank(torch.ones(4, 1), torch.ones(1, 18), shape=(4, 2, 3, 3))
    assert conv.dense().shape == (4, 2, 3, 3)
    with pytest.raises(ValueError, match=r"expected B \(out, r\) and A \(r, in\)"):
        LowRank(torch.ones(4, 2), torch.ones(3, 3))


def test_norms_sparsity_cosine():
    tv = TaskVector.from_mapping({"a": torch.tensor([3.0, 0.0]), "b": torch.tensor([[0.0, 4.0]])})
    assert tv.norms() == {"a": 3.0, "b": 4.0}
    assert tv.norm() == 5.0
    assert tv.sparsity() == 0.5
    assert abs(tv.cosine(tv) - 1) < 1e-12 and abs(tv.cosine(-tv) + 1) < 1e-12
    other = TaskVector.from_mapping({"a": torch.tensor([0.0, 1.0]), "b": torch.tensor([[0.0, 0.0]])})
    assert tv.cosine(other) == 0.0
    assert tv.stats()["b"]["max_abs"] == 4.0


def test_save_load_roundtrip_keeps_lowrank(tmp_path):
    lr = LowRank(torch.randn(4, 2), torch.randn(2, 3), 0.25)
    tv = TaskVector.from_mapping({"x": torch.randn(4, 3), "y": lr})
    tv.save(tmp_path / "tv")
    back = TaskVector.load(tmp_path / "tv")
    assert isinstance(back.get("y"), LowRank) and back.get("y").scale == 0.25
    for k in tv:
        assert torch.equal(back[k], tv[k])
    with pytest.raises(DeltakitFileError, match="expected a deltakit task vector"):
        TaskVector.load(_save_dir(tmp_path, "m", _sd(0)))


def test_apply_to_model_and_checkpoint(tmp_path):
    torch.manual_seed(0)
    base_m, ft_m = torch.nn.Linear(3, 4), torch.nn.Linear(3, 4)
    base_sd = {k: v.detach().clone() for k, v in base_m.state_dict().items()}
    ft_sd = {k: v.detach().clone() for k, v in ft_m.state_dict().items()}
    tv = TaskVector.from_state_dicts(ft_sd, base_sd)
    tv.apply(base_m)
    assert all(torch.allclose(base_m.state_dict()[k], ft_sd[k], atol=1e-6) for k in ft_sd)
    bdir = _save_dir(tmp_path, "base", base_sd)
    out = tv.apply_to_checkpoint(bdir, tmp_path / "out", scale=1.0, max_shard_bytes=20)
    ck = LazyCheckpoint(out)
    assert (out / "config.json").is_file() and (out / "model.safetensors.index.json").is_file()
    assert all(torch.allclose(ck.get(k), ft_sd[k], atol=1e-6) for k in ft_sd)
    bf = tv.apply_to_checkpoint(bdir, tmp_path / "bf", dtype=torch.bfloat16)
    assert LazyCheckpoint(bf).dtype("weight") == torch.bfloat16
    with pytest.raises(KeyError, match="expected parameter 'nope'"):
        TaskVector.from_mapping({"nope": torch.zeros(1)}).apply(base_m)


def test_lora_merges_stay_low_rank_and_dense_merges_refactorise():
    """Issue: linear combinations of LoRA deltas stay exactly low-rank (concatenated
    factors); dense merges (TIES) re-factorise to a chosen rank with the error reported."""
    import deltakit as dk
    from deltakit.merge import build_config, merge_task_vectors
    from deltakit.taskvec import LowRank, as_dense
    from tests.conftest import make_model

    tvs = []
    for seed, r in [(0, 2), (1, 3)]:
        m = make_model("bert")
        ad = dk.attach(m, dk.LoraConfig(r=r))
        torch.manual_seed(seed)
        for p in ad.parameters():
            torch.nn.init.normal_(p, std=0.2)
        tvs.append(TaskVector.from_adapter(ad))
    combo = 0.5 * tvs[0] + 0.25 * tvs[1]
    name = next(iter(combo.keys()))
    entry = combo.get(name)
    assert isinstance(entry, LowRank) and entry.rank == 5
    exact = 0.5 * as_dense(tvs[0].get(name)) + 0.25 * as_dense(tvs[1].get(name))
    torch.testing.assert_close(as_dense(entry), exact, rtol=1e-5, atol=1e-6)
    same, err = combo.to_low_rank(5)
    assert all(e == 0.0 for e in err.values())

    ties = merge_task_vectors("ties", tvs, build_config("ties", {"density": 0.3}))
    low, err = ties.to_low_rank(4)
    for n in ties.keys():
        dense = as_dense(ties.get(n))
        approx = as_dense(low.get(n))
        rel = float((dense - approx).norm() / dense.norm())
        assert abs(rel - err[n]) < 1e-4 and 0 < err[n] < 1          # reported error is the real one
        assert isinstance(low.get(n), LowRank) and low.get(n).rank == 4
