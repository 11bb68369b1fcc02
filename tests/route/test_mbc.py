"""MBC: spherical K-means of a library by the cosine of its adapters' dW, one merged adapter per
cluster (the merge engine's average, stored exactly as a LoRA), lineage, and the router over them."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch

import deltakit as dk
from deltakit.io.adapter_files import read_manifest
from deltakit.library import AdapterLibrary
from deltakit.route import RoutingError, get_router
from deltakit.route.mbc import (MBC, Clustering, build_cluster_adapters, cluster_library, cosine_matrix, kmeans,
                                merge_members)
from deltakit.taskvec import TaskVector
from tests.library._helpers import mlp


def test_kmeans_on_planted_groups_hand_checked():
    x = torch.tensor([[1.0, 0.1], [0.0, 1.0], [1.0, -0.1], [0.1, 1.0], [0.9, 0.0], [-0.1, 0.9]])
    assert kmeans(x, 2, seed=0).tolist() == [0, 1, 0, 1, 0, 1]  # numbered by first appearance
    assert kmeans(x, 1).tolist() == [0] * 6 and kmeans(x, 6).tolist() == [0, 1, 2, 3, 4, 5]
    # spherical: length does not matter, only direction (Euclidean K-means would split by length here)
    y = torch.tensor([[10.0, 0.0], [0.1, 0.0], [0.0, 10.0], [0.0, 0.1]])
    assert kmeans(y, 2).tolist() == [0, 0, 1, 1]
    assert all(kmeans(torch.randn(12, 5, generator=torch.Generator().manual_seed(s)), 3, seed=s).tolist()
               == kmeans(torch.randn(12, 5, generator=torch.Generator().manual_seed(s)), 3, seed=s).tolist()
               for s in range(3))
    with pytest.raises(RoutingError, match=r"^kmeans: expected \(N, D\) points and 1 <= clusters <= N"):
        kmeans(x, 7)


def _planted(out: Path, base, centre: int, member: int, targets=("0", "2")) -> Path:
    """A r=2 LoRA whose factors are group ``centre``'s plus 10% member noise: two groups of
    adapters with near-parallel dW within a group and unrelated dW across groups."""
    name = out.name
    ad = dk.attach(base, dk.LoraConfig(r=2, alpha=2.0, targets=list(targets)), name=name, activate=False)
    gc, gm = torch.Generator().manual_seed(100 + centre), torch.Generator().manual_seed(200 + member)
    with torch.no_grad():
        for _, p in sorted(ad.named_parameters()):
            p.copy_(torch.randn(p.shape, generator=gc) + 0.1 * torch.randn(p.shape, generator=gm))
    dk.save_adapter(ad, out)
    dk.detach(base, name)
    return out


@pytest.fixture
def lib(tmp_path):
    """a0, b0, a1, b1 (groups a and b, interleaved), a2 targeting layer '0' only."""
    base, lib = mlp(), AdapterLibrary(tmp_path / "lib")
    for i, (name, group) in enumerate([("a0", 0), ("b0", 1), ("a1", 0), ("b1", 1)]):
        lib.add(_planted(tmp_path / name, base, group, i), model=base, name=name)
    lib.add(_planted(tmp_path / "a2", base, 0, 9, targets=("0",)), model=base, name="a2")
    return lib


def _dense(lib, ref: str) -> dict[str, torch.Tensor]:
    m = mlp()
    ad = lib.load(m, ref, name="x")
    return {n: v.double() for n, v in ((n, TaskVector.from_adapter(ad).dense(n)) for n in TaskVector.from_adapter(ad).keys())}


def _cos(a: dict, b: dict) -> float:
    dot = sum(float((a[n] * b[n]).sum()) for n in a if n in b)
    na, nb = (sum(float((t * t).sum()) for t in d.values()) ** 0.5 for d in (a, b))
    return dot / (na * nb)


@pytest.mark.parametrize("exact", [False, True])
def test_the_library_splits_into_the_planted_groups(lib, exact):
    cl = cluster_library(lib, 2, seed=0, exact=exact, model=mlp() if exact else None)
    assert cl.refs == ("a0@1", "a1@1", "a2@1", "b0@1", "b1@1") and cl.labels == (0, 0, 0, 1, 1)
    assert cl.members(1) == ["b0@1", "b1@1"]
    dense = {r: _dense(lib, r) for r in cl.refs}
    want = torch.tensor([[_cos(dense[a], dense[b]) for b in cl.refs] for a in cl.refs])
    # exact cosines from the factors are the dense ones; the 64-number sketch approximates them
    assert torch.allclose(cl.cosine, want.float(), atol=1e-5 if exact else 0.35)
    assert cl.within(1) == pytest.approx(float(cl.cosine[3, 4]))
    assert cl.between(0, 1) == pytest.approx(float(cl.cosine[:3, 3:].mean()), abs=1e-6)
    assert cl.within(0) > 0.5 > cl.between(0, 1)
    rows = cl.rows()
    assert rows[1]["members"] == "b0@1, b1@1" and rows[1]["cos between (nearest)"].endswith("(cluster 0)")
    assert cl.table().splitlines()[0].split(" | ")[0] == "cluster"


def test_cluster_errors_are_one_line(lib):
    with pytest.raises(RoutingError, match=r"^mbc: expected 1 <= clusters <= 5 \(the entries to cluster\), found 6"):
        cluster_library(lib, 6)
    with pytest.raises(RoutingError, match="^mbc: exact cosines load the adapters; expected the base model"):
        cosine_matrix(lib, ["a0"], exact=True)


def test_merged_cluster_adapter_is_the_average_of_its_members_with_lineage(lib):
    base = mlp()
    cl = cluster_library(lib, 2, seed=0)
    entries = build_cluster_adapters(lib, cl, base)
    assert [e.ref for e in entries] == ["mbc-0@1", "mbc-1@1"] and all("mbc" in e.tags for e in entries)
    for e, k in zip(entries, (0, 1)):
        members = cl.members(k)
        assert sorted(p for p, _ in e.lineage) == sorted(lib.get(m).id for m in members)
        assert {h for _, h in e.lineage} == {"merge"} and e.method == "lora"
        got, parts = _dense(lib, e.ref), [_dense(lib, m) for m in members]
        for n in got:  # a member without layer '2' (a2) counts as zero there: the average is over all
            avg = sum(p[n] if n in p else torch.zeros_like(got[n]) for p in parts) / len(parts)
            assert torch.allclose(got[n], avg, atol=1e-5), n
        assert set(got) == {"0.weight", "2.weight"}
    assert entries[0].manifest["config"]["r"] == 6  # a0 + a1 + a2: rank 2 each, stored exactly
    # the MBC adapters are not clustered again by default
    assert cluster_library(lib, 2).refs == cl.refs


def test_merge_members_uses_the_merge_engine_and_reports_the_exact_rank(lib):
    m = merge_members(lib, ["a0", "b0"], mlp(), method="task_arithmetic")
    a, b = _dense(lib, "a0"), _dense(lib, "b0")
    assert m.rank == 4 and m.ranks == {"0.weight": 4, "2.weight": 4}
    assert torch.allclose(m.delta.dense("0.weight").double(), a["0.weight"] + b["0.weight"], atol=1e-5)
    q = m.bases["0.weight"]  # orthonormal (in, 4): the rows of both members' A
    assert q.shape == (12, 4) and torch.allclose(q.T @ q, torch.eye(4, dtype=q.dtype), atol=1e-12)


def test_train_fn_replaces_the_merged_adapter(lib, tmp_path):
    base = mlp()
    cl = cluster_library(lib, 2, seed=0)
    seen = []

    def train_fn(k, members, merged_dir):
        seen.append((k, [m.ref for m in members], (merged_dir / "adapter.json").is_file()))
        return _planted(tmp_path / f"trained-{k}", base, 5, 50 + k)

    entries = build_cluster_adapters(lib, cl, base, prefix="clu", train_fn=train_fn)
    assert seen == [(0, ["a0@1", "a1@1", "a2@1"], True), (1, ["b0@1", "b1@1"], True)]
    assert [e.ref for e in entries] == ["clu-0@1", "clu-1@1"]
    assert entries[1].sha256 == read_manifest(tmp_path / "trained-1")["tensors"]["sha256"]


def test_mbc_router_is_arrow_over_the_cluster_adapters(lib):
    arrow = pytest.importorskip("deltakit.route.arrow")
    base = mlp()
    entries = build_cluster_adapters(lib, cluster_library(lib, 2, seed=0), base)
    router = MBC.from_library(lib, base, top_k=1)
    assert get_router("mbc") is MBC and router.clusters == tuple(e.ref for e in entries)
    assert router.describe() == "mbc: Arrow over 2 cluster adapters (mbc-0@1, mbc-1@1)"
    other = mlp()  # the same base, a second object: Arrow alone, built as MBC builds it
    ref = arrow.Arrow.from_library(lib, [e.ref for e in entries], other, top_k=1, temperature=1.0)
    for name, e in zip(ref.names, entries):
        if name not in dk.adapters(other):
            lib.load(other, e.ref, name=name, activate=False)
    assert router.names == ref.names and set(router.names) <= set(dk.adapters(base))
    x = torch.randn(4, 12, generator=torch.Generator().manual_seed(3))
    with router.scope(base, {"x": x}):
        got = base(x)
    with ref.scope(other, {"x": x}):
        want = other(x)
    assert torch.equal(got, want) and router.decisions == ref.decisions
    with dk.disabled(base):
        assert not torch.allclose(got, base(x))  # the cluster adapters did change the output


def test_mbc_router_needs_cluster_adapters(lib):
    with pytest.raises(RoutingError, match=r"^mbc: expected cluster adapters \(entries tagged 'mbc'\)"):
        MBC.from_library(lib, mlp())
    with pytest.raises(RoutingError, match="^mbc: no Arrow router"):
        MBC(names=("a",)).weights_for(mlp(), {})


def test_a_rank_cap_stores_the_truncated_svd_of_the_average(lib):
    base = mlp()
    cl = cluster_library(lib, 2, seed=0)
    e = build_cluster_adapters(lib, cl, base, rank=2)[1]  # b0 + b1: rank 4 exactly, capped at 2
    got = _dense(lib, e.ref)
    avg = {n: (_dense(lib, "b0")[n] + _dense(lib, "b1")[n]) / 2 for n in got}
    assert e.manifest["config"]["r"] == 2
    for n, m in avg.items():
        U, S, Vh = torch.linalg.svd(m)
        assert torch.allclose(got[n], (U[:, :2] * S[:2]) @ Vh[:2], atol=1e-5), n  # Eckart-Young


def test_cluster_lora_layouts_other_than_linear(tmp_path):
    """GPT-2's Conv1D stores its weight transposed: the factors go through LoRA.factors()' views."""
    from deltakit.route.mbc import MergedCluster, _row_bases, write_cluster_lora
    from tests.conftest import make_model

    model = make_model("gpt2")
    ad = dk.attach(model, dk.LoraConfig(r=2, targets=["c_attn", "c_fc"]), name="src", activate=False)
    with torch.no_grad():
        for _, p in sorted(ad.named_parameters()):
            p.copy_(torch.randn(p.shape, generator=torch.Generator().manual_seed(p.numel())))
    tv = TaskVector.from_adapter(ad)
    dk.detach(model, "src")
    merged = MergedCluster(tv, {n: 2 for n in tv.keys()}, _row_bases([tv]))
    out = write_cluster_lora(merged, model, tmp_path / "c", name="c")
    back = TaskVector.from_adapter(dk.load_adapter(make_model("gpt2"), out, name="c"))
    assert sorted(back.keys()) == sorted(tv.keys()) and "c" not in dk.adapters(model)
    for n in tv.keys():
        assert torch.allclose(back.dense(n), tv.dense(n), atol=1e-5), n
