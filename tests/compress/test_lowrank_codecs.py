"""Low-rank and quantising codecs (issue 15, item 1): svd, quant, svd_quant, deltacome.

Hand-worked codes on tiny tensors, the documented error bounds as properties, exact
rank recovery, energy / bits rank choice, bits/param from the stored parts against the
planning formula, file round trips bit-exact in decode, inputs never mutated."""
from __future__ import annotations

import math

import pytest
import torch

from deltakit.compress import CompressConfigError, build_compressor_config, compress_tensor, get_compressor
from deltakit.compress.codecs.deltacome import DeltaComeConfig, deltacome, plan_bands
from deltakit.compress.codecs.quant import (QuantLowRank, Quantized, SvdQuantConfig, quantize, svd_quant,
                                            vector_bits)
from deltakit.compress.codecs.svd import Factored, SvdConfig, energy_rank, randomized_svd, svd
from deltakit.taskvec import LowRank, TaskVector

NAMES = ("svd", "quant", "svd_quant", "deltacome")


@pytest.fixture(autouse=True)
def _one_lapack_thread():
    """LAPACK (QR, SVD) on 2 threads of an oversubscribed 2-core machine spins: a 120x40 QR
    took 1.8 s on 2 threads against 0.05 ms on 1. These tests time nothing; keep them fast."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def _low_rank(out: int, inn: int, r: int, noise: float = 0.0, seed: int = 0, dtype=torch.float32) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    m = torch.randn(out, r, generator=g, dtype=torch.float64) @ torch.randn(r, inn, generator=g, dtype=torch.float64)
    m = m / math.sqrt(r) + noise * torch.randn(out, inn, generator=g, dtype=torch.float64)
    return m.to(dtype)


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b.double()).norm() / b.double().norm())


# ----------------------------------------------------------------------------- quant: hand-worked codes
def test_int4_symmetric_one_group_by_hand():
    x = torch.tensor([[0.875, -0.4375, 0.125, 0.0, -0.875, 0.25, 0.5, -0.0625]])
    v = compress_tensor(x, "quant", bits=4, group_size=8)
    # s = 0.875 / 7 = 0.125; q = round(x / s) (half to even: -3.5 -> -4, -0.5 -> 0); code = q + 7
    # codes [14, 3, 8, 7, 0, 9, 11, 7], two per byte, low nibble first
    assert v.q.codes.tolist() == [14 | 3 << 4, 8 | 7 << 4, 0 | 9 << 4, 11 | 7 << 4] == [62, 120, 144, 123]
    assert v.q.scales.dtype == torch.float16 and v.q.scales.tolist() == [[0.125]] and v.q.offsets is None
    assert v.to_dense().tolist() == [[0.875, -0.5, 0.125, 0.0, -0.875, 0.25, 0.5, 0.0]]
    assert float((v.to_dense() - x).abs().max()) == 0.0625  # = s/2: the bound is tight
    assert v.bits_per_param == (4 * 8 + 16) / 8 == 6.0


def test_int4_asymmetric_one_group_by_hand():
    x = torch.tensor([[-0.5, 1.375, 0.0, 0.3, 0.6, -0.2, 0.9, 0.1]])
    v = compress_tensor(x, "quant", bits=4, group_size=8, symmetric=False)
    # lo = -0.5, s = (1.375 + 0.5) / 15 = 0.125; q = round((x - lo) / s) = [0, 15, 4, 6, 9, 2, 11, 5]
    assert v.q.offsets.tolist() == [[-0.5]] and v.q.scales.tolist() == [[0.125]]
    assert v.q.codes.tolist() == [0 | 15 << 4, 4 | 6 << 4, 9 | 2 << 4, 11 | 5 << 4]
    assert v.to_dense().tolist() == [[-0.5, 1.375, 0.0, 0.25, 0.625, -0.25, 0.875, 0.125]]
    assert v.bits_per_param == (4 * 8 + 2 * 16) / 8


def test_groups_run_along_the_input_dim_and_a_short_last_group_keeps_its_own_range():
    x = torch.tensor([[1.0, 2.0, 3.0, 4.0, 0.0, 0.0, 0.0, 0.0, -7.0, 0.5]])
    v = compress_tensor(x, "quant", bits=4, group_size=4)
    s = v.q.scales.float()
    assert tuple(s.shape) == (1, 3)
    assert float(s[0, 0]) >= 4 / 7 and float(s[0, 0]) == float(torch.tensor(4 / 7).half()) or \
        float(s[0, 0]) == float(torch.nextafter(torch.tensor(4 / 7).half(), torch.tensor(1.0).half()))
    assert s[0, 1:].tolist() == [0.0, 1.0]  # the 2-entry group: max |x| = 7 -> s = 1, padding not counted
    assert v.to_dense()[0, 4:].tolist() == [0.0, 0.0, 0.0, 0.0, -7.0, 0.0]  # round(0.5) = 0 (half to even)
    assert v.q.codes.numel() == 5  # 10 codes x 4 bits: the padding is not stored


def test_two_bit_symmetric_has_three_levels():
    v = compress_tensor(torch.tensor([[0.9, -0.9, 0.2, -0.6]]), "quant", bits=2, group_size=4)
    assert v.q.scales.tolist() == [[pytest.approx(0.9, rel=1e-3)]]
    s = float(v.q.scales)
    assert v.to_dense().tolist() == [[pytest.approx(s), pytest.approx(-s), 0.0, pytest.approx(-s)]]


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize("symmetric", [True, False])
def test_quant_error_is_at_most_half_a_stored_scale_per_entry(bits, symmetric):
    x = torch.randn(6, 100, generator=torch.Generator().manual_seed(bits)) * 1e-3  # delta-sized entries
    v = compress_tensor(x, "quant", bits=bits, group_size=32, symmetric=symmetric)
    s = v.q.scales.float().repeat_interleave(32, 1)[:, :100]
    assert bool(((v.to_dense() - x).abs() <= s / 2 * (1 + 1e-5) + 1e-12).all())


def test_int8_is_near_lossless_and_error_shrinks_with_bits():
    x = _low_rank(64, 128, 64, seed=1)
    errs = {b: _rel(compress_tensor(x, "quant", bits=b).to_dense(), x) for b in (2, 3, 4, 8)}
    assert errs[8] < 0.01 and errs[8] < errs[4] < errs[3] < errs[2]


def test_scale_that_overflows_fp16_is_a_one_line_error():
    with pytest.raises(ValueError, match="fit float16.*scale_dtype float32"):
        compress_tensor(torch.tensor([[1e7, 1.0]]), "quant", bits=8)  # 1e7 / 127 > 65504
    v = compress_tensor(torch.tensor([[1e7, 1.0]]), "quant", bits=8, scale_dtype="float32")
    assert v.to_dense()[0, 0] == pytest.approx(1e7, rel=1e-6)


# ----------------------------------------------------------------------------- bits per parameter
@pytest.mark.parametrize("knobs, shape, expected", [
    (dict(bits=4, group_size=64), (128, 256), 4.25),
    (dict(bits=4, group_size=64, symmetric=False), (128, 256), 4.5),
    (dict(bits=8, group_size=128), (64, 2, 64), 8.125),
    (dict(bits=3, group_size=64, scale_dtype="float32"), (32, 128), 3.5),
    (dict(bits=4, group_size=64), (10, 100), (4000 + 10 * 2 * 16) / 1000),  # two groups per row
    (dict(bits=2, group_size=16), (40,), (80 + 3 * 16) / 40),               # 1-D: one row
])
def test_quant_bits_per_param_counted_from_stored_parts_matches_theory(knobs, shape, expected):
    v = compress_tensor(torch.randn(shape), "quant", **knobs)
    assert v.bits_per_param == pytest.approx(expected, abs=1e-12)
    assert get_compressor("quant").bits(build_compressor_config("quant", knobs), shape) == pytest.approx(expected)


@pytest.mark.parametrize("name, knobs", [
    ("svd", dict(rank=5)), ("svd", dict(bits=2.0)), ("svd", dict(rank=3, factor_dtype="float32")),
    ("svd_quant", dict(rank=7, qbits=4)), ("svd_quant", dict(bits=1.5, qbits=3, symmetric=False)),
    ("deltacome", dict()), ("deltacome", dict(ratio=16)), ("deltacome", dict(bits=3.0, schedule=(8, 4), band_ranks=(4,))),
])
def test_planned_bits_equal_the_stored_bits(name, knobs):
    x = _low_rank(96, 160, 20, noise=0.1)
    v = compress_tensor(x, name, **knobs)
    planned = get_compressor(name).bits(build_compressor_config(name, knobs), (96, 160))
    assert v.bits_per_param == pytest.approx(planned, abs=1e-12)
    target = knobs.get("bits", 32 / knobs["ratio"] if "ratio" in knobs else None)
    if target is not None and name != "deltacome":
        assert v.bits_per_param <= target


# ----------------------------------------------------------------------------- svd
def test_exact_rank_r_input_is_recovered_by_rank_r():
    x = _low_rank(40, 30, 3)
    v = compress_tensor(x, "svd", rank=3, factor_dtype="float32")
    assert isinstance(v, Factored) and isinstance(v, LowRank) and v.rank == 3
    assert _rel(v.to_dense(), x) < 1e-6
    assert v.bits_per_param == 3 * (40 + 30) * 32 / (40 * 30)
    half = compress_tensor(x, "svd", rank=3)  # fp16 factors: about 2^-11 relative per entry
    assert half.B.dtype == torch.float16 and _rel(half.to_dense(), x) < 2e-3
    assert float(half.B.abs().max()) <= 1 and float(half.A.abs().max()) <= 1  # balanced, scale = S_1


def test_truncation_error_is_the_dropped_singular_values():
    x = _low_rank(50, 40, 40, seed=3)
    s = torch.linalg.svdvals(x.double())
    v = compress_tensor(x, "svd", rank=10, factor_dtype="float32")
    assert float((v.to_dense().double() - x.double()).norm()) == pytest.approx(float(s[10:].norm()), rel=1e-4)


def test_energy_picks_the_rank_worked_by_hand():
    # singular values 4, 3, 2, 1: energies 16, 9, 4, 1 of 30 -> cumulative 0.533, 0.833, 0.967, 1
    q, _ = torch.linalg.qr(torch.randn(6, 4, generator=torch.Generator().manual_seed(0)))
    x = q @ torch.diag(torch.tensor([4.0, 3.0, 2.0, 1.0])) @ torch.eye(4, 5)
    for energy, rank in [(0.5, 1), (0.8, 2), (25 / 30, 2), (0.84, 3), (0.97, 4), (1.0, 4)]:
        assert compress_tensor(x, "svd", energy=energy).rank == rank, energy
    assert energy_rank(torch.tensor([4.0, 3.0, 2.0, 1.0]), 30.0, 0.84) == 3


def test_bits_picks_the_largest_rank_that_fits():
    # (64 + 32) * 16 = 1536 bits per rank; 2 bits/param of 2048 params = 4096 bits -> rank 2
    v = compress_tensor(_low_rank(64, 32, 8), "svd", bits=2.0)
    assert v.rank == 2 and v.bits_per_param == 2 * 1536 / 2048
    assert compress_tensor(_low_rank(64, 32, 8), "svd", bits=0.5).rank == 0  # nothing fits: an empty delta


def test_randomized_svd_is_close_to_exact_and_seeded():
    x = _low_rank(200, 150, 10, noise=1e-2, seed=5)
    exact = compress_tensor(x, "svd", rank=10, factor_dtype="float32")
    rnd = compress_tensor(x, "svd", rank=10, factor_dtype="float32", method="randomized", seed=7)
    e_exact, e_rnd = _rel(exact.to_dense(), x), _rel(rnd.to_dense(), x)
    assert e_exact * (1 - 1e-5) <= e_rnd < e_exact * 1.01  # Eckart-Young: exact is optimal, up to rounding
    again = compress_tensor(x, "svd", rank=10, factor_dtype="float32", method="randomized", seed=7)
    assert torch.equal(again.B, rnd.B) and torch.equal(again.A, rnd.A)
    u, s, vh = randomized_svd(x, 10, 8, 2, 0)
    assert torch.allclose(s, torch.linalg.svdvals(x)[:10], rtol=1e-4)


def test_randomized_energy_rank_is_never_below_the_exact_one():
    x = _low_rank(120, 90, 40, noise=0.05, seed=2)
    for energy in (0.5, 0.9, 0.99):
        exact = compress_tensor(x, "svd", energy=energy).rank
        rnd = compress_tensor(x, "svd", energy=energy, method="randomized")
        assert exact <= rnd.rank <= exact + 2, energy


def test_svd_of_a_lora_refactors_it_exactly_and_truncates():
    g = torch.Generator().manual_seed(4)
    lora = LowRank(torch.randn(20, 6, generator=g), torch.randn(6, 12, generator=g), 0.5)
    v = compress_tensor(lora.to_dense(), "svd", rank=6, factor_dtype="float32")
    w = svd(lora, SvdConfig(rank=6, factor_dtype="float32"))
    assert _rel(w.to_dense(), lora.to_dense()) < 1e-6 and _rel(v.to_dense(), w.to_dense()) < 1e-6
    s = torch.linalg.svdvals(lora.to_dense().double())
    w3 = svd(lora, SvdConfig(rank=3, factor_dtype="float32"))
    assert float((w3.to_dense().double() - lora.to_dense().double()).norm()) == pytest.approx(float(s[3:].norm()),
                                                                                             rel=1e-4)


def test_conv_and_1d_deltas():
    conv = _low_rank(8, 27, 2).reshape(8, 3, 3, 3)
    v = compress_tensor(conv, "svd", rank=2, factor_dtype="float32")
    assert v.shape == (8, 3, 3, 3) and tuple(v.A.shape) == (2, 27) and _rel(v.to_dense(), conv) < 1e-6
    bias = torch.tensor([0.5, -0.25, 3.0])
    b = compress_tensor(bias, "svd")  # stored dense, as the rank-1 factorisation [bias] @ [[1]]
    assert b.to_dense().tolist() == [0.5, -0.25, 3.0] and b.bits_per_param == (3 + 1) * 16 / 3
    q = compress_tensor(conv, "quant", bits=8, group_size=27)
    assert tuple(q.q.scales.shape) == (8, 1) and q.to_dense().shape == conv.shape


def test_dtypes_round_trip():
    x = _low_rank(16, 24, 4, dtype=torch.bfloat16)
    for name in NAMES:
        assert compress_tensor(x, name).to_dense().dtype == torch.bfloat16, name
    x64 = _low_rank(16, 24, 4, dtype=torch.float64)
    v = compress_tensor(x64, "svd", rank=4, factor_dtype="float32")
    assert v.to_dense().dtype == torch.float64 and _rel(v.to_dense(), x64) < 1e-6


def test_factored_arithmetic_stays_factored():
    x = _low_rank(12, 10, 2)
    v = compress_tensor(x, "svd", rank=2)
    assert isinstance(v * 2.0, Factored) and torch.equal((v * 2.0).to_dense(), v.to_dense() * 2)
    lora = LowRank(torch.ones(12, 1), torch.ones(1, 10), 0.5)
    assert isinstance(v + lora, LowRank) and torch.allclose((v + lora).to_dense(), v.to_dense() + 0.5)
    q = compress_tensor(x, "svd_quant", rank=2, qbits=8)
    assert isinstance(q + lora, LowRank) and torch.allclose((q + lora).to_dense(), q.to_dense() + 0.5, atol=1e-6)
    assert q.norm() == pytest.approx(float(q.to_dense().double().norm()), rel=1e-6)


# ----------------------------------------------------------------------------- svd_quant
def _bound(v: QuantLowRank, x: torch.Tensor) -> float:
    """The module's Frobenius bound: dropped tail + per-component quantisation of u and v."""
    u, s, vh = torch.linalg.svd(x.double(), full_matrices=False)
    r = v.rank
    lr = v.to_lowrank(torch.float64)
    uq, vq = lr.B / v.s.double(), lr.A
    eu, ev = (uq - u[:, :r]).norm(dim=0), (vq - vh[:r]).norm(dim=1)
    return float(s[r:].norm() + (s[:r] * (eu + ev + eu * ev)).sum())


@pytest.mark.parametrize("qbits", [2, 4, 8])
def test_svd_quant_error_within_documented_bound(qbits):
    x = _low_rank(64, 48, 12, noise=0.05, seed=qbits)
    v = compress_tensor(x, "svd_quant", rank=8, qbits=qbits, group_size=16)
    assert isinstance(v, QuantLowRank) and v.rank == 8 and v.s.dtype == torch.float32
    err = float((v.to_dense().double() - x.double()).norm())
    assert err <= _bound(v, x) * (1 + 1e-6)
    for u, vv in v.bands:  # each singular vector entry within half its group's scale
        assert u.bits == vv.bits == qbits and (u.rows, u.cols, vv.cols) == (8, 64, 48)


def test_svd_quant_8bit_full_rank_is_near_lossless():
    x = _low_rank(32, 32, 32, seed=9)
    assert _rel(compress_tensor(x, "svd_quant", rank=32, qbits=8).to_dense(), x) < 0.01


def test_svd_quant_as_is_quantises_a_loras_factors():
    g = torch.Generator().manual_seed(1)
    lora = LowRank(torch.randn(40, 4, generator=g), torch.randn(4, 24, generator=g), 0.25)
    v = svd_quant(lora, SvdQuantConfig(factors="as_is", qbits=8, group_size=8))
    assert v.s is None and v.rank == 4 and v.scale == 0.25
    (ut, a), = v.bands
    sb = ut.scales.float().repeat_interleave(8, 1)[:, :40]
    assert bool(((ut.to_dense() - lora.B.T).abs() <= sb / 2 * (1 + 1e-5)).all())
    lr = v.to_lowrank()
    assert torch.allclose(lr.to_dense(), 0.25 * ut.to_dense().T @ a.to_dense())
    assert _rel(v.to_dense(), lora.to_dense()) < 0.02
    with pytest.raises(TypeError, match="expected a LowRank"):
        svd_quant(lora.to_dense(), SvdQuantConfig(factors="as_is"))


# ----------------------------------------------------------------------------- delta-come
def test_deltacome_plan_worked_by_hand():
    # 512x512, groups of 128, asymmetric fp16 (32 bits a group), fp32 s:
    # a component at b bits costs 1024 b + (4 + 4) * 32 + 32 = 1024 b + 288; budget 1 bit/param = 262144
    # 2 x 8-bit = 16960, 32 x 3-bit = 107520, left 137664 // (2048 + 288) = 58 at 2 bits
    cfg = DeltaComeConfig()
    assert vector_bits(512, 512, 2, cfg) == 2336
    assert plan_bands(cfg, (512, 512)) == [(2, 8), (32, 3), (58, 2)]
    assert get_compressor("deltacome").bits(cfg, (512, 512)) == (16960 + 107520 + 58 * 2336) / 262144
    # a budget too small for the top band: the 8-bit band takes what fits, the rest goes on down
    assert plan_bands(DeltaComeConfig(bits=0.04), (512, 512)) == [(1, 8), (0, 3), (0, 2)]
    assert plan_bands(DeltaComeConfig(ratio=8), (512, 512)) == [(2, 8), (32, 3), (395, 2)]


def test_deltacome_spends_more_bits_on_larger_singular_values():
    x = _low_rank(160, 128, 40, noise=0.01, seed=11)
    cfg = DeltaComeConfig(bits=2.5, group_size=64)
    v = deltacome(x, cfg)
    assert [(u.rows, u.bits) for u, _ in v.bands] == [(k, b) for k, b in plan_bands(cfg, (160, 128)) if k]
    assert [u.bits for u, _ in v.bands] == [8, 3, 2]
    assert torch.allclose(v.s, torch.linalg.svdvals(x)[: v.rank], rtol=1e-5)
    assert float((v.to_dense().double() - x.double()).norm()) <= _bound(v, x) * (1 + 1e-6)
    # the 8-bit band reconstructs its components far better than a uniform 2-bit one would
    top8 = _rel(v.bands[0][0].to_dense(), torch.linalg.svd(x)[0][:, :2].T)
    two = compress_tensor(x, "svd_quant", rank=2, qbits=2, group_size=64, symmetric=False)
    assert top8 < 0.02 < _rel(two.bands[0][0].to_dense(), torch.linalg.svd(x)[0][:, :2].T)


def test_deltacome_beats_plain_low_rank_at_the_same_size_on_a_long_tailed_spectrum():
    g = torch.Generator().manual_seed(3)
    u, _ = torch.linalg.qr(torch.randn(192, 192, generator=g))
    w, _ = torch.linalg.qr(torch.randn(192, 192, generator=g))
    x = u @ torch.diag(torch.arange(1, 193.0) ** -0.7) @ w.T  # a fine-tuning delta's slow power-law tail
    dc = compress_tensor(x, "deltacome", bits=1.0)
    lr = compress_tensor(x, "svd", bits=dc.bits_per_param)
    assert lr.bits_per_param <= dc.bits_per_param and _rel(dc.to_dense(), x) < _rel(lr.to_dense(), x)


def test_deltacome_of_a_lora_keeps_at_most_its_rank_and_no_empty_bands():
    g = torch.Generator().manual_seed(6)
    lora = LowRank(torch.randn(64, 4, generator=g), torch.randn(4, 48, generator=g), 2.0)
    v = deltacome(lora, DeltaComeConfig(bits=4.0, group_size=16))
    assert [(u.rows, u.bits) for u, _ in v.bands] == [(2, 8), (2, 3)] and v.s.numel() == 4
    assert torch.allclose(v.s, torch.linalg.svdvals(lora.to_dense())[:4], rtol=1e-5)


# ----------------------------------------------------------------------------- files, purity, knobs
def test_round_trip_through_a_task_vector_file_is_bit_exact(tmp_path):
    x = _low_rank(24, 40, 5, noise=0.1)
    lora = LowRank(torch.randn(24, 3), torch.randn(3, 40), 0.5)
    values = {
        "svd.weight": compress_tensor(x, "svd", rank=4),
        "svd.bias": compress_tensor(x[:, 0], "svd"),
        "quant.weight": compress_tensor(x, "quant", bits=3, group_size=16, symmetric=False),
        "quant.bias": compress_tensor(x[0], "quant", bits=4),
        "sq.weight": compress_tensor(x, "svd_quant", energy=0.9, qbits=4),
        "lora_q.weight": svd_quant(lora, SvdQuantConfig(factors="as_is")),
        "dc.weight": compress_tensor(x, "deltacome", bits=2.0, group_size=16),
        "dc_conv.weight": compress_tensor(x.reshape(24, 5, 8), "deltacome", bits=2.0, group_size=16),
    }
    back = TaskVector.load(TaskVector.from_mapping(values).save(tmp_path / "tv"))
    for n, v in values.items():
        got = back.get(n)
        assert type(got) is type(v) and got.shape == v.shape and got.dtype == v.dtype, n
        assert torch.equal(got.to_dense(), v.to_dense()), n
        assert got.nbytes == v.nbytes, n


@pytest.mark.parametrize("name", NAMES)
def test_inputs_are_never_mutated_or_aliased(name):
    for x in (_low_rank(20, 30, 4, noise=0.1), torch.randn(7), torch.randn(6, 2, 3, 3)):
        before = x.clone()
        v = compress_tensor(x, name)
        assert torch.equal(x, before), name
        dense = v.to_dense()
        x.add_(1.0)  # a later change to the input must not leak into the value
        assert torch.equal(v.to_dense(), dense), name
    lora = LowRank(torch.randn(10, 2), torch.randn(2, 8), 0.5)
    b, a = lora.B.clone(), lora.A.clone()
    svd(lora, SvdConfig(rank=1)), svd_quant(lora, SvdQuantConfig(factors="as_is")), deltacome(lora, DeltaComeConfig())
    assert torch.equal(lora.B, b) and torch.equal(lora.A, a)


@pytest.mark.parametrize("name, knobs, message", [
    ("svd", {"rank": 4, "energy": 0.9}, "at most one of rank / energy / bits"),
    ("svd", {"energy": 1.5}, r"energy: expected a number in \(0, 1\], found 1.5"),
    ("svd", {"method": "lanczos"}, "expected one of"),
    ("quant", {"bits": 9}, r"bits: expected an integer in \[2, 8\], found 9"),
    ("quant", {"group_size": 0}, "group_size: expected a positive integer, found 0"),
    ("svd_quant", {"factors": "as_is", "rank": 4}, "expected no rank / energy / bits with factors='as_is'"),
    ("deltacome", {"schedule": "8,3", "band_ranks": "2,3"}, r"len\(band_ranks\) = len\(schedule\) - 1"),
    ("deltacome", {"schedule": "8,1", "band_ranks": "2"}, r"schedule\[1\]: expected an integer in \[2, 8\]"),
    ("deltacome", {"bits": 1.0, "ratio": 16}, "at most one of bits / ratio"),
])
def test_bad_knobs_are_one_line_errors(name, knobs, message):
    with pytest.raises(CompressConfigError, match=message) as e:
        build_compressor_config(name, knobs)
    assert "\n" not in str(e.value)


def test_bad_inputs_are_one_line_errors():
    with pytest.raises(ValueError, match="0-d tensor"):
        compress_tensor(torch.tensor(1.0), "quant")
    with pytest.raises(ValueError, match="expected finite values"):
        compress_tensor(torch.tensor([[1.0, math.inf]]), "quant")
    with pytest.raises(ValueError, match="expected 2-8 bits"):
        quantize(torch.ones(2, 2), 1, 2)
    assert isinstance(compress_tensor(torch.zeros(4, 6), "quant"), Quantized)
    assert compress_tensor(torch.zeros(4, 6), "svd").to_dense().abs().max() == 0
