"""The size budget: convex hulls, the greedy Lagrangian allocation (hand-checked), never over the budget,
never worse than the best single codec+setting at the same size, activation weighting, streaming."""
from __future__ import annotations

import itertools
from dataclasses import dataclass

import pytest
import torch
from torch import nn

import deltakit as dk
from deltakit.compress import _registry
from deltakit.compress.api import compress
from deltakit.compress.budget import (KEEP, BudgetError, Measured, Point, Setting, activation_stats, allocate,
                                      default_grid, hull, measure, parse_size, plan_budget, weighted_error)
from deltakit.compress.container import load_compressed
from deltakit.core.fields import knob
from deltakit.taskvec import LowRank, TaskVector


@dataclass(frozen=True)
class _RankConfig:
    rank: int = knob(4, ge=1, le=64, log=True, doc="rank kept")


@pytest.fixture
def lowrank_codec():
    """A test-local truncated-SVD compressor (the existing LowRank value), unregistered afterwards."""
    def enc(dw, cfg):
        """truncated SVD (test)"""
        if dw.dim() != 2 or cfg.rank > min(dw.shape):
            raise ValueError(f"expected a matrix with both sides >= {cfg.rank}, found {tuple(dw.shape)}")
        return LowRank.from_dense(dw, cfg.rank)[0]
    _registry.register_compressor("test_svd", config=_RankConfig)(enc)
    yield "test_svd"
    _registry._COMPRESSORS.pop("test_svd")


def _pts(label: str, *pairs: tuple[int, float]) -> tuple[Point, ...]:
    return tuple(Point(Setting(label, (("s", i),)), b, e) for i, (b, e) in enumerate(pairs, 1))


def _measured(name, pts):
    return Measured(name, 100, 400, 100.0, pts)


# ----------------------------------------------------------------------------- hand-worked
def test_hull_drops_dominated_and_non_convex_points():
    pts = _pts("c", (10, 100), (20, 50), (30, 40), (25, 60), (40, 10), (50, 10))
    # (25, 60) and (50, 10) are dominated; (30, 40) lies above the chord (20, 50)-(40, 10), which is 30 there
    assert [(p.bytes, p.error) for p in hull(pts)] == [(10, 100), (20, 50), (40, 10)]


def _toy():
    return {"A": _measured("A", _pts("c", (100, 50), (200, 10), (400, 0))),
            "B": _measured("B", _pts("c", (100, 20), (200, 15), (400, 0)))}


def _brute(measured, budget):
    best = None
    for combo in itertools.product(*(m.points for m in measured.values())):
        b, e = sum(p.bytes for p in combo), sum(p.error for p in combo)
        if b <= budget and (best is None or e < best):
            best = e
    return best


def test_two_tensor_toy_allocation_by_hand():
    # A's hull slopes -0.4 then -0.05 per byte; B's (200, 15) is not on its hull (slope -0.05 then -0.075),
    # so B's hull is (100, 20) -> (400, 0). Budget 300: start at 200 bytes, the best step is A's -0.4 (+100),
    # then nothing else fits: A=(200, 10), B=(100, 20), error 30 (the exhaustive optimum).
    a = allocate(_toy(), 300)
    assert (a.choices["A"].bytes, a.choices["B"].bytes, a.total_error, a.method) == (200, 100, 30, "rate-distortion")
    assert a.total_error == _brute(_toy(), 300)
    # budget 600: A's step (-0.4) first, then B's single hull step (-0.067, +300 bytes) before A's second
    # (-0.05): 200 + 400 = 600 bytes, error 10 + 0 = 10; A's second step would need 200 bytes more.
    a = allocate(_toy(), 600)
    assert (a.choices["A"].bytes, a.choices["B"].bytes, a.total_error) == (200, 400, 10)
    assert a.total_error == _brute(_toy(), 600)


def test_leftover_bytes_buy_a_point_off_the_hull():
    # budget 400: the hull steps stop at A=(200, 10), B=(100, 20) with 100 bytes left; B's (200, 15), off its
    # hull, fits in them: error 25, the exhaustive optimum
    a = allocate(_toy(), 400)
    assert (a.choices["A"].bytes, a.choices["B"].bytes, a.total_error, a.method) == (200, 200, 25, "rate-distortion")
    assert _brute(_toy(), 400) == 25


def test_uniform_setting_wins_where_the_greedy_commits_early():
    # A's (200, 63) is off its hull (slopes -0.15 then -0.63), so A's hull is (100, 78) -> (300, 0), slope -0.39;
    # B's hull is all three points (slopes -0.51, -0.11). Budget 400 from 200 bytes: B's -0.51 step (300 bytes),
    # A's -0.39 step needs 200 more (no), B's -0.11 step (400 bytes): 78 + 31 = 109, nothing left to fill.
    # Setting s2 on both: 200 + 200 bytes, 63 + 42 = 105 - the allocation takes it and says so.
    toy = {"A": _measured("A", _pts("c", (100, 78), (200, 63), (300, 0))),
           "B": _measured("B", _pts("c", (100, 93), (200, 42), (300, 31)))}
    a = allocate(toy, 400)
    assert (a.total_bytes, a.total_error, a.method) == (400, 105, "uniform c(s=2)")
    # the limit of the method, stated: the exact knapsack optimum here is A=(300, 0), B=(100, 93), error 93;
    # the hull allocation is exact only at budgets on the hulls' vertices
    assert _brute(toy, 400) == 93


def test_budget_below_the_smallest_candidates_is_an_error():
    assert allocate(_toy(), 200).total_bytes == 200
    with pytest.raises(BudgetError, match="expected a budget of at least 200 bytes .* found 199"):
        allocate(_toy(), 199)


def test_weighted_error_by_hand():
    dw, approx = torch.tensor([[1.0, 2.0], [3.0, 4.0]]), torch.zeros(2, 2)
    assert weighted_error(dw, approx) == 30.0
    # column sums of squares [10, 20] weighted by E[x^2] = [1, 0.5]
    assert weighted_error(dw, approx, torch.tensor([1.0, 0.5])) == 20.0
    assert weighted_error(torch.tensor([3.0, 4.0]), torch.zeros(2), torch.tensor([9.0])) == 25.0  # a bias: unweighted
    with pytest.raises(BudgetError, match="expected 2 input features, found 3"):
        weighted_error(dw, approx, torch.ones(3))


def test_parse_size():
    assert (parse_size("20MB"), parse_size("512KiB"), parse_size("4096"), parse_size("1.5 GiB")) == \
        (20_000_000, 524_288, 4096, 1_610_612_736)
    with pytest.raises(BudgetError, match="expected a size such as 20MB"):
        parse_size("20 parsecs")


def test_default_grid_sweeps_knobs_from_the_declarations(lowrank_codec):
    labels = [s.label for s in default_grid(["topk", lowrank_codec])]
    assert labels[:3] == ["topk(density=1.0)", "topk(density=0.5)", "topk(density=0.25)"]
    assert "topk(density=0.0009765625)" in labels and labels[-1] == KEEP
    assert [x for x in labels if x.startswith("test_svd")] == [f"test_svd(rank={r})" for r in (1, 2, 4, 8, 16, 32, 64)]
    with pytest.raises(Exception, match="found 'nope'"):
        default_grid(["nope"])


# ----------------------------------------------------------------------------- the target
def _spectra_delta() -> TaskVector:
    """Tensors of different spectra: rank-2 plus faint noise, heavy-tailed (a few large entries),
    flat Gaussian noise, a small-norm one and a bias."""
    g = torch.Generator().manual_seed(0)
    lowrank = torch.randn(64, 2, generator=g) @ torch.randn(2, 48, generator=g) + 0.01 * torch.randn(64, 48, generator=g)
    heavy = torch.randn(48, 64, generator=g).pow(5) * 0.05
    return TaskVector.from_mapping({"lowrank": lowrank, "heavy": heavy, "noise": 0.3 * torch.randn(64, 64, generator=g),
                                    "small": 0.01 * torch.randn(32, 32, generator=g),
                                    "bias": torch.randn(64, generator=g)})


def test_allocation_beats_every_single_setting_at_its_size(lowrank_codec, tmp_path):
    tv = _spectra_delta()
    grid = default_grid(["topk", lowrank_codec])
    measured = measure(tv, grid)
    per = [{p.setting: p for p in m.points} for m in measured.values()]
    uniform = [s for s in grid if all(s in d for d in per)]   # test_svd cannot take the bias: not uniform
    assert len(uniform) == 12
    strictly_better = 0
    for s in uniform:
        size, err = sum(d[s].bytes for d in per), sum(d[s].error for d in per)
        a = allocate(measured, size)
        assert a.total_bytes <= size and a.total_error <= err * (1 + 1e-12), s.label
        strictly_better += a.total_error < 0.5 * err
    assert strictly_better >= 5   # mixing codecs per tensor at least halves the error at 5 of the 10 lossy sizes
    # at the size of topk(density=1/8) everywhere: low-rank for the low-rank tensor, top-k for the heavy one
    s = Setting("topk", (("density", 0.125),))
    size = sum(d[s].bytes for d in per)
    a = allocate(measured, size)
    assert a.choices["lowrank"].setting.codec == "test_svd" and a.choices["heavy"].setting.codec == "topk"
    assert a.total_error < 0.2 * sum(d[s].error for d in per)


def test_written_file_matches_the_plan_and_stays_under_budget(lowrank_codec, tmp_path):
    tv = _spectra_delta()
    for ratio in (4, 32):
        res = compress(tv, tmp_path / f"r{ratio}", ratio=ratio, codecs=["topk", lowrank_codec])
        a, f = res.allocation, load_compressed(res.path, verify=True)
        assert f.total_bytes == a.total_bytes <= a.budget == int(a.original_bytes / ratio)
        assert {n: r.bytes for n, r in f.records.items()} == {n: c.bytes for n, c in a.choices.items()}
        got = sum(float((tv[n].double() - f.task_vector()[n].double()).pow(2).sum()) for n in tv.keys())
        assert got == pytest.approx(a.total_error, rel=1e-9)
        assert "TOTAL" in a.table() and f"budget {a.budget:,} bytes" in a.table()


def test_measure_streams_each_tensor_once_and_encodes_again_once(tmp_path):
    calls: dict[str, int] = {}

    def entry(name, t):
        def thunk():
            calls[name] = calls.get(name, 0) + 1
            return t
        return thunk
    g = torch.Generator().manual_seed(1)
    tv = TaskVector.from_mapping({f"w{i}": entry(f"w{i}", torch.randn(16, 16, generator=g)) for i in range(3)})
    compress(tv, tmp_path / "c", ratio=8, codecs=["topk"])
    assert calls == {"w0": 2, "w1": 2, "w2": 2}   # measured once, encoded once when written


# ----------------------------------------------------------------------------- activations
def test_activation_stats_by_hand_and_through_a_deltakit_layer():
    torch.manual_seed(0)
    m = nn.Sequential(nn.Linear(2, 3), nn.ReLU(), nn.Linear(3, 1))
    x = torch.tensor([[1.0, 2.0], [3.0, -4.0]])
    st = activation_stats(m, [x[:1], x[1:]])
    assert torch.allclose(st["0.weight"], torch.tensor([5.0, 10.0]))       # mean of [1, 9] and [4, 16]
    h = torch.relu(m[0](x))
    assert torch.allclose(st["2.weight"], h.pow(2).mean(0))
    dk.attach(m, dk.LoraConfig(r=1, targets=("0",)))
    st2 = activation_stats(m, [x])
    assert set(st2) == {"0.weight", "2.weight"} and torch.allclose(st2["0.weight"], torch.tensor([5.0, 10.0]))


def test_activation_weights_move_bytes_to_the_inputs_that_matter():
    g = torch.Generator().manual_seed(2)
    w = torch.randn(32, 32, generator=g)
    tv = TaskVector.from_mapping({"a": w, "b": w.clone()})
    ones = torch.ones(32)
    plain = plan_budget(tv, ratio=8, codecs=["topk"])
    weighted = plan_budget(tv, ratio=8, codecs=["topk"], stats={"a": ones, "b": 100 * ones})
    # 1024 bytes do not buy density 1/4 for both: unweighted, the tie goes to the first name; weighted by
    # 100x larger inputs, b gets the bytes
    assert plain.choices["a"].bytes > plain.choices["b"].bytes
    assert weighted.choices["b"].bytes > weighted.choices["a"].bytes
    assert weighted.choices["b"].error == pytest.approx(100 * weighted_error(w, _decoded(weighted, "b", w)))


def _decoded(alloc, name, w):
    return alloc.choices[name].setting.encode(w).to_dense()


def test_single_codec_keeps_what_it_cannot_encode_and_says_so(lowrank_codec, tmp_path):
    tv = _spectra_delta()
    res = compress(tv, tmp_path / "c", codec=lowrank_codec, knobs={"rank": 2})
    assert list(res.kept) == ["bias"] and "expected a matrix" in res.kept["bias"]
    f = load_compressed(tmp_path / "c", verify=True)
    assert (f.records["bias"].compressor, f.records["bias"].codec) == (None, "dense")
    assert (f.records["lowrank"].compressor, f.records["lowrank"].knobs, f.records["lowrank"].bytes) == \
        ("test_svd", {"rank": 2}, (64 * 2 + 2 * 48) * 4)
    with pytest.raises(ValueError, match="choose a budget's candidates"):
        compress(tv, tmp_path / "d", codec="topk", codecs=["topk"])
