"""Sparse and sign codecs (topk, DARE, ComPEFT, BitDelta) and the bit-level pieces under them.

Hand-worked numbers on tiny tensors first (every decoded value written out), then the
contract every codec keeps: file round trip bit-exact, bits/param counted from the stored
parts equal to the planning formula, near-lossless at full density, inputs untouched,
one-line errors for bad knobs.
"""
from __future__ import annotations

import copy
import doctest
import math

import pytest
import torch
from torch import nn

from deltakit.compress import CompressConfigError, build_compressor_config, compress_tensor, get_compressor
from deltakit.compress import _bits, _sparse
from deltakit.compress._bits import pack, pack_signs, packed_bytes, unpack, unpack_signs
from deltakit.compress._sparse import decode_positions, encode_positions, position_bits
from deltakit.compress.codecs import bitdelta as bitdelta_mod
from deltakit.compress.codecs import compeft as compeft_mod
from deltakit.compress.codecs import dare as dare_mod
from deltakit.compress.codecs import topk as topk_mod
from deltakit.compress.codecs.bitdelta import BitDelta, distill_scales
from deltakit.compress.codecs.compeft import SignSparse
from deltakit.compress.codecs.topk import Sparse, keep_largest
from deltakit.core.seeding import generator
from deltakit.taskvec import TaskVector

from ..conftest import make_model

X23 = torch.tensor([[0.5, -2.0, 3.0], [4.0, -0.25, 0.0]])


def gaussian(shape=(512, 512), seed=0, dtype=torch.float32) -> torch.Tensor:
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed), dtype=dtype)


def rel_err(x: torch.Tensor, y: torch.Tensor) -> float:
    return float(torch.linalg.vector_norm((x - y).double()) / torch.linalg.vector_norm(x.double()))


# ----------------------------------------------------------------------------- _bits
def test_pack_3bit_codes_straddle_byte_boundaries():
    # code i occupies bits 3i..3i+2, least significant first:
    # 5=101 -> b0..2 = 1,0,1 | 3=011 -> b3..5 = 1,1,0 | 7 -> b6..8 = 1,1,1 | 0 -> b9..11 | 6=110 -> b12..14 = 0,1,1
    # byte 0 = b0..7 = 1,0,1,1,1,0,1,1 = 1+4+8+16+64+128 = 221; byte 1 = b8..15 = 1,0,0,0,0,1,1,0 = 1+32+64 = 97
    codes = torch.tensor([5, 3, 7, 0, 6], dtype=torch.uint8)
    packed = pack(codes, 3)
    assert packed.dtype == torch.uint8 and packed.tolist() == [221, 97]
    assert packed_bytes(5, 3) == 2
    assert unpack(packed, 3, 5).tolist() == [5, 3, 7, 0, 6]


def test_pack_wide_codes_and_signs():
    codes = torch.tensor([4095, 1, 2048])
    packed = pack(codes, 12)
    assert packed.numel() == packed_bytes(3, 12) == 5
    # 4095 fills bits 0-11 (byte 0 = 255, low nibble of byte 1); 1 sets bit 12 (byte 1 = 15 + 16 = 31);
    # 2048 is bit 11 of the third code: bit 24 + 11 = 35, bit 3 of byte 4 = 8
    assert packed.tolist() == [255, 31, 0, 0, 8]
    out = unpack(packed, 12, 3)
    assert out.dtype == torch.int64 and out.tolist() == [4095, 1, 2048]
    signs = pack_signs(torch.tensor([0.5, -1.0, 0.0, -3.0, 2.0, 2.0, -1.0, 1.0, -0.1]))
    assert signs.tolist() == [1 + 4 + 16 + 32 + 128, 0]  # zero counts as positive
    assert unpack_signs(signs, 9).tolist() == [1, -1, 1, -1, 1, 1, -1, 1, -1]


@pytest.mark.parametrize("call, needle", [
    (lambda: pack(torch.tensor([8]), 3), "expected codes in [0, 8) for 3-bit packing, found [8, 8]"),
    (lambda: pack(torch.tensor([1]), 0), "expected a code width of 1-32 bits, found 0"),
    (lambda: pack(torch.tensor([1]), 33), "expected a code width of 1-32 bits, found 33"),
    (lambda: unpack(torch.tensor([1], dtype=torch.uint8), 3, 5), "expected at least 2 uint8 bytes for 5 3-bit codes"),
])
def test_bits_bad_input_is_one_line(call, needle):
    with pytest.raises(ValueError) as e:
        call()
    assert needle in str(e.value) and "\n" not in str(e.value)


# ----------------------------------------------------------------------------- _sparse
def test_dense_positions_choose_the_bitmask():
    parts, meta = encode_positions(torch.tensor([0, 3, 4, 9]), 10)
    # Rice would cost 4 gaps * (b + 1) bits + quotients >= 4 bits; the mask costs 10: mask wins
    assert meta == {"index": "mask", "k": 4, "n": 10}
    assert parts["mask"].tolist() == [1 + 8 + 16, 2]  # bits 0, 3, 4 | bit 9 -> bit 1 of byte 1
    assert decode_positions(parts, meta).tolist() == [0, 3, 4, 9]


def test_sparse_positions_choose_rice_with_hand_worked_codes():
    # n=100, k=4: mean gap 24, b = floor(log2(24 ln 2)) = floor(log2(16.6)) = 4
    # gaps p_i - p_{i-1} - 1 = 2, 37, 0, 48 -> q = g >> 4 = 0, 2, 0, 3, r = g & 15 = 2, 5, 0, 0
    # unary (q ones, then a zero): 0 | 110 | 0 | 1110 -> bits 0,1,1,0,0,1,1,1,0 -> bytes 2+4+32+64+128 = 230, 0
    # Rice size 5 + 4 * 5 = 25 bits < 100: Rice wins
    parts, meta = encode_positions(torch.tensor([2, 40, 41, 90]), 100)
    assert meta == {"index": "rice", "k": 4, "n": 100, "b": 4}
    assert parts["unary"].tolist() == [230, 0]
    assert parts["rem"].tolist() == [2 | 5 << 4, 0]
    assert decode_positions(parts, meta).tolist() == [2, 40, 41, 90]


def test_truncated_rice_index_raises():
    parts, meta = encode_positions(torch.tensor([2, 40, 41, 90]), 100)
    cut = {**parts, "unary": parts["unary"][:1]}    # the last gap's terminating zero is gone
    with pytest.raises(ValueError, match="expected 4 coded gaps, found 3: the index is truncated"):
        decode_positions(cut, meta)


def test_positions_round_trip_and_planned_size():
    n = 1 << 16
    for k in (0, 1, 100, 3000, 40000, n):
        pos = torch.randperm(n, generator=torch.Generator().manual_seed(k))[:k].sort().values
        parts, meta = encode_positions(pos, n)
        assert decode_positions(parts, meta).tolist() == pos.tolist()
        stored = 8 * sum(t.numel() for t in parts.values())
        # random positions: the planned size is the expected one, within a byte and 3 % (k = 0 stores nothing)
        assert abs(stored - position_bits(k, n)) <= 8 + 0.03 * position_bits(k, n)
        assert meta["index"] == {0: "none", 40000: "mask", n: "all"}.get(k, "rice")
    with pytest.raises(ValueError, match="expected sorted distinct positions"):
        encode_positions(torch.tensor([3, 3]), 10)


# ----------------------------------------------------------------------------- topk
def test_topk_hand_worked():
    v = compress_tensor(X23, "topk", density=0.5)
    assert isinstance(v, Sparse) and v.positions.tolist() == [1, 2, 3]
    # values divided by 4, the power of two at or above the largest |kept|, so fp16 never goes subnormal
    assert v.values.dtype == torch.float16 and v.values.tolist() == [-0.5, 0.75, 1.0] and v.scale == 4.0
    assert v.to_dense().tolist() == [[0.0, -2.0, 3.0], [4.0, 0.0, 0.0]]


def test_topk_ties_go_to_the_lowest_positions_and_the_count_is_exact():
    x = torch.tensor([1.0, -1.0, 1.0, -1.0, 0.5, 1.0])
    assert keep_largest(x, 0.5).tolist() == [0, 1, 2]             # five entries tie at |1|: k = 3
    assert keep_largest(torch.ones(10_000), 0.25).tolist() == list(range(2500))
    assert keep_largest(torch.arange(10.0), 0.3).tolist() == [7, 8, 9]   # 0.3 * 10 = 3.0000000000000004
    assert keep_largest(torch.tensor([3.0, -5.0, 0.0]), 0.01).tolist() == [1]


def test_topk_density_one_is_exact():
    x = gaussian((64, 48))
    assert compress_tensor(x, "topk", density=1.0).bits_per_param == 16.0     # every position: no index stored
    assert torch.equal(compress_tensor(x, "topk", density=1.0, value_dtype="float32").to_dense(), x)
    assert torch.equal(compress_tensor(x, "topk", density=1.0).to_dense(), x.half().float())   # |x| < 4: no shift
    for magnitude in (1e-6, 1e-2, 1e3):          # fine-tuning deltas are often ~1e-5, where fp16 is subnormal
        assert rel_err(magnitude * x, compress_tensor(magnitude * x, "topk", density=1.0).to_dense()) < 3e-4


# ----------------------------------------------------------------------------- DARE
def test_dare_hand_worked_with_the_seeded_stream():
    # generator(0, "w") draws these six numbers; p = 0.5 keeps the entries whose draw is < 0.5
    draws = torch.rand(6, generator=generator(0, "w"))
    assert [round(float(d), 4) for d in draws] == [0.9785, 0.7777, 0.3232, 0.4557, 0.1418, 0.7106]
    v = compress_tensor(X23, "dare", p=0.5, key="w")
    # kept 3, 4, -0.25 are stored as 0.75, 1, -0.0625 (divided by 4); the scale is 4 / (1 - 0.5) = 8
    assert isinstance(v, Sparse) and v.scale == 8.0 and v.positions.tolist() == [2, 3, 4]
    assert v.values.tolist() == [0.75, 1.0, -0.0625]
    assert v.to_dense().tolist() == [[0.0, 0.0, 6.0], [8.0, -0.5, 0.0]]   # kept entries times 1 / (1 - 0.5)


def test_dare_mask_matches_dare_merge_for_the_same_seed_and_name():
    from deltakit.merge._parts import SPARSIFY
    from deltakit.merge.executor import tensor_generator
    x = gaussian((40, 30), seed=3)
    v = compress_tensor(x, "dare", p=0.9, seed=7, key="layers.0.q.weight")
    merge_mask = SPARSIFY["random"](x.reshape(-1), 0.1, tensor_generator(7, "layers.0.q.weight"), 0.0, 0.0)
    assert v.positions.tolist() == torch.nonzero(merge_mask).squeeze(1).tolist()


def test_dare_is_unbiased_and_its_error_is_as_documented():
    x = gaussian((4, 5), seed=1)
    p, runs = 0.5, 2000
    dec = torch.stack([compress_tensor(x, "dare", p=p, seed=s, key="t", value_dtype="float32").to_dense()
                       for s in range(runs)])
    # the mean of decode is dW: each entry's mean has std |x| sqrt(p / (1-p)) / sqrt(runs) = 0.022 |x|
    assert float(((dec.mean(0) - x).abs() / x.abs()).max()) < 5 * math.sqrt(p / (1 - p) / runs)
    # E |decode - dW|^2 = p / (1 - p) |dW|^2
    mse = float(((dec - x) ** 2).sum((1, 2)).mean())
    assert mse == pytest.approx(p / (1 - p) * float((x ** 2).sum()), rel=0.1)


def test_dare_seed_key_and_content_key():
    x = gaussian((32, 32), seed=2)
    a = compress_tensor(x, "dare", p=0.8)
    assert torch.equal(a.positions, compress_tensor(x.clone(), "dare", p=0.8).positions)   # same bytes, same mask
    assert not torch.equal(a.positions, compress_tensor(x + 1, "dare", p=0.8).positions)   # other bytes, other mask
    assert not torch.equal(a.positions, compress_tensor(x, "dare", p=0.8, seed=1).positions)
    for y in (x.bfloat16(), x.double()):                                       # the bytes of any dtype
        assert torch.equal(compress_tensor(y, "dare", p=0.8).positions,
                           compress_tensor(y.clone(), "dare", p=0.8).positions)
    named = compress_tensor(x, "dare", p=0.8, key="a.weight")
    assert torch.equal(named.positions, compress_tensor(3 * x, "dare", p=0.8, key="a.weight").positions)
    assert not torch.equal(named.positions, compress_tensor(x, "dare", p=0.8, key="b.weight").positions)


def test_dare_p_zero_is_exact():
    x = gaussian((16, 24))
    v = compress_tensor(x, "dare", p=0.0, value_dtype="float32")
    assert torch.equal(v.to_dense(), x)


# ----------------------------------------------------------------------------- ComPEFT
def test_compeft_hand_worked_alpha_times_the_tensor_std():
    # x has mean 0 and sum of squares 20, so its unbiased std is sqrt(20 / 5) = 2; alpha = 1 -> scale 2.
    # density 0.5 keeps 3 entries: |3|, |-3|, then |-1| and |1| tie and the lower position (2) wins
    x = torch.tensor([[3.0, -3.0, -1.0], [1.0, 0.0, 0.0]])
    v = compress_tensor(x, "compeft", density=0.5, alpha=1.0)
    assert isinstance(v, SignSparse) and v.positions.tolist() == [0, 1, 2] and v.scale == 2.0
    assert v.to_dense().tolist() == [[2.0, -2.0, -2.0], [0.0, 0.0, 0.0]]
    parts = v.tensors()
    assert parts["signs"].tolist() == [1] and parts["scale"].dtype == torch.float32   # signs +, -, - -> bits 1,0,0
    assert parts["scale"].tolist() == [2.0]


def test_compeft_hand_worked_given_sigma_and_default_l2_alpha():
    v = compress_tensor(X23, "compeft", density=0.5, alpha=2.0, sigma=0.5)
    assert v.scale == 1.0 and v.to_dense().tolist() == [[0.0, -1.0, 1.0], [1.0, 0.0, 0.0]]
    w = compress_tensor(X23, "compeft", density=0.5)                  # mean of |-2|, |3|, |4| = 3
    assert w.scale == 3.0 and w.to_dense().tolist() == [[0.0, -3.0, 3.0], [3.0, 0.0, 0.0]]


def test_compeft_never_keeps_zeros_and_is_exact_on_ternary_input():
    x = torch.tensor([[0.25, 0.0, -0.25], [0.0, 0.0, 0.25]])
    v = compress_tensor(x, "compeft", density=1.0, alpha=None)
    assert v.positions.tolist() == [0, 2, 5] and torch.equal(v.to_dense(), x)
    dense = compress_tensor(gaussian((64, 64)), "compeft", density=1.0)      # no zeros: every position, no index
    assert dense.meta()["index"] == "all" and dense.bits_per_param == 1 + 32 / 64 ** 2


def test_an_all_zero_delta_stores_no_positions():
    v = compress_tensor(torch.zeros(64, 64), "compeft")
    assert v.positions.numel() == 0 and v.meta()["index"] == "none" and v.nbytes == 4   # the fp32 scale only
    assert torch.equal(v.to_dense(), torch.zeros(64, 64))


def test_compeft_error_is_the_dropped_tail_plus_the_kept_spread():
    x = gaussian((128, 96), seed=4)
    v = compress_tensor(x, "compeft", density=0.2, alpha=None)
    kept = x.reshape(-1)[v.positions]
    dropped = torch.ones(x.numel(), dtype=torch.bool)
    dropped[v.positions] = False
    expected = float((x.reshape(-1)[dropped] ** 2).sum() + ((kept.abs() - v.scale) ** 2).sum())
    assert float(((x - v.to_dense()) ** 2).sum()) == pytest.approx(expected, rel=1e-5)
    # the L2-optimal scale beats alpha * sigma for every alpha tried
    best = float(((x - v.to_dense()) ** 2).sum())
    for a in (0.5, 1.0, 2.0, 3.0):
        assert float(((x - compress_tensor(x, "compeft", density=0.2, alpha=a).to_dense()) ** 2).sum()) > best


# ----------------------------------------------------------------------------- BitDelta
def test_bitdelta_hand_worked():
    x = torch.tensor([[1.0, -2.0, 3.0], [-4.0, 0.0, 2.0]])
    v = compress_tensor(x, "bitdelta")
    assert isinstance(v, BitDelta) and v.scale == 2.0                  # mean |x| = 12 / 6
    assert v.to_dense().tolist() == [[2.0, -2.0, 2.0], [-2.0, 2.0, 2.0]]   # sign(0) = +1, as the official code
    parts = v.tensors()
    assert parts["signs"].tolist() == [1 + 4 + 16 + 32] and parts["scale"].tolist() == [2.0]


def test_bitdelta_error_identity_and_exact_sign_input():
    x = gaussian((96, 80), seed=5)
    v = compress_tensor(x, "bitdelta")
    err = float(((x.double() - v.to_dense().double()) ** 2).sum())
    assert err == pytest.approx(float((x.double() ** 2).sum()) - x.numel() * v.scale ** 2, rel=1e-5)
    assert rel_err(x, v.to_dense()) == pytest.approx(math.sqrt(1 - 2 / math.pi), abs=0.01)
    s = torch.where(gaussian((7, 9), seed=6) > 0, 0.125, -0.125)
    assert torch.equal(compress_tensor(s, "bitdelta").to_dense(), s)


# ----------------------------------------------------------------------------- the contract, every codec
CASES = [("topk", {"density": 0.1}), ("dare", {"p": 0.9, "key": "w"}), ("compeft", {"density": 0.1}),
         ("compeft", {"density": 0.1, "alpha": 1.5}), ("bitdelta", {})]


@pytest.mark.parametrize("name, knobs", CASES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
def test_file_round_trip_is_bit_exact(tmp_path, name, knobs, dtype):
    x = gaussian((33, 17), seed=8, dtype=torch.float32).to(dtype)
    v = compress_tensor(x, name, **knobs)
    out = TaskVector.from_mapping({"layer.weight": v, "layer.bias": x[0].clone()}).save(tmp_path / "tv")
    back = TaskVector.load(out).get("layer.weight")
    assert type(back) is type(v) and back.shape == (33, 17) and back.dtype == dtype
    assert torch.equal(back.to_dense(), v.to_dense()) and back.to_dense().dtype == dtype
    assert back.nbytes == v.nbytes


@pytest.mark.parametrize("name, knobs", CASES)
def test_inputs_are_never_mutated(name, knobs):
    for x in (gaussian((20, 30), seed=9), gaussian((20, 30), seed=9).bfloat16()):
        before = x.clone()
        v = compress_tensor(x, name, **knobs)
        v.to_dense().add_(1.0)                      # a decode is a fresh tensor too
        v.scaled(3.0)
        assert torch.equal(x, before)


@pytest.mark.parametrize("name, knobs, planned", [
    # fp16 values + Rice positions of 26,214 random-ish entries among 262,144
    ("topk", {"density": 0.1}, None),
    ("dare", {"p": 0.9, "key": "w"}, None),
    ("compeft", {"density": 0.1}, None),
    ("bitdelta", {}, 1 + 32 / 512 ** 2),
])
def test_bits_per_param_from_the_stored_parts_match_the_plan(name, knobs, planned):
    x = gaussian()
    v = compress_tensor(x, name, **knobs)
    stored = 8 * sum(t.numel() * t.element_size() for t in v.tensors().values()) / x.numel()
    plan = get_compressor(name).bits(build_compressor_config(name, knobs), tuple(x.shape))
    assert v.bits_per_param == stored
    assert stored == pytest.approx(plan, rel=0.02)
    if planned is not None:
        assert stored == planned


def test_bitdelta_on_256x256_costs_one_bit_plus_the_scale():
    v = compress_tensor(gaussian((256, 256)), "bitdelta")
    assert v.nbytes == 256 * 256 // 8 + 4 and v.bits_per_param == 1.00048828125


def test_sign_codecs_compress_by_the_promised_ratios():
    x = gaussian()
    # ComPEFT at density 0.1: 1 sign bit + about log2(10) + 2 position bits per kept entry
    assert compress_tensor(x, "compeft", density=0.1).bits_per_param < 0.1 * (1 + math.log2(10) + 2)
    assert compress_tensor(x, "dare", p=0.9, key="w").bits_per_param < 0.1 * (16 + math.log2(10) + 2) + 0.01


@pytest.mark.parametrize("name, knobs, needle", [
    ("topk", {"density": 0}, "TopKConfig.density: expected a number in (0, 1], found 0"),
    ("topk", {"density": 1.5}, "TopKConfig.density: expected a number in (0, 1], found 1.5"),
    ("dare", {"p": 1}, "DareConfig.p: expected a number in [0, 1), found 1"),
    ("dare", {"p": -0.1}, "DareConfig.p: expected a number in [0, 1), found -0.1"),
    ("dare", {"seed": "x"}, "expected an integer, found 'x'"),
    ("compeft", {"alpha": 0}, "ComPeftConfig.alpha: expected a positive number, found 0"),
    ("compeft", {"sigma": -1}, "ComPeftConfig.sigma: expected a positive number, found -1"),
    ("compeft", {"density": 2}, "ComPeftConfig.density: expected a number in (0, 1], found 2"),
    ("bitdelta", {"alpha": 1}, "expected a field of bitdelta ([]), found 'alpha'"),
])
def test_bad_knobs_are_one_line_errors(name, knobs, needle):
    with pytest.raises(CompressConfigError) as e:
        compress_tensor(gaussian((4, 4)), name, **knobs)
    assert needle in str(e.value) and "\n" not in str(e.value)


def test_compact_arithmetic_stays_compact_and_exact():
    x = gaussian((30, 20), seed=10)
    for name, knobs in CASES:
        v = compress_tensor(x, name, **knobs)
        s = v.scaled(-0.5)
        assert type(s) is type(v) and torch.equal(s.to_dense(), v.to_dense() * -0.5)
        assert v.norm() == pytest.approx(float(torch.linalg.vector_norm(v.to_dense().double())), rel=1e-6)


def test_docstring_examples_hold():
    for mod in (_bits, _sparse, topk_mod, dare_mod, compeft_mod, bitdelta_mod):
        result = doctest.testmod(mod)
        assert result.failed == 0, mod.__name__


# ----------------------------------------------------------------------------- BitDelta scale distillation
def test_distillation_finds_the_least_squares_scale_of_a_linear_model():
    # student logits x (W0 + s S)^T are linear in s: the MSE-optimal scale is <xS^T, x dW^T> / |xS^T|^2
    g = torch.Generator().manual_seed(11)
    base = nn.Linear(6, 4, bias=False)
    with torch.no_grad():
        base.weight.copy_(torch.randn(4, 6, generator=g))
    dw = 0.1 * torch.randn(4, 6, generator=g) + 0.05
    teacher = copy.deepcopy(base)
    with torch.no_grad():
        teacher.weight += dw
    x = torch.randn(32, 6, generator=g) * torch.tensor([3.0, 1.0, 1.0, 0.2, 0.2, 0.2])   # some inputs matter more
    v = compress_tensor(dw, "bitdelta")
    xs, xd = x @ v.signs().T, x @ dw.T
    best = float((xs * xd).sum() / (xs * xs).sum())
    new, losses = distill_scales(base, teacher, {"weight": v}, [x], steps=300, lr=0.01)
    assert isinstance(new["weight"], BitDelta) and torch.equal(new["weight"].positive, v.positive)
    assert v.scale == pytest.approx(0.0801, abs=1e-4) and best == pytest.approx(0.0589, abs=1e-4)  # L2 != output
    assert new["weight"].scale == pytest.approx(best, abs=1e-4)
    assert losses[-1] < losses[0]


@pytest.mark.slow
def test_distillation_on_a_tiny_llama_lowers_the_logit_loss_and_changes_nothing_else():
    base = make_model("llama", 0)
    ft = copy.deepcopy(base)
    g = torch.Generator().manual_seed(5)
    names = [n for n, _ in base.named_parameters() if "proj" in n]
    with torch.no_grad():
        for n, p in ft.named_parameters():
            if n in names:
                p += 0.05 * torch.randn(p.shape[0], 2, generator=g) @ torch.randn(2, p.shape[1], generator=g)
                p += 0.01 * torch.randn(p.shape, generator=g)
    bp, fp = dict(base.named_parameters()), dict(ft.named_parameters())
    values = {n: compress_tensor(fp[n].detach() - bp[n].detach(), "bitdelta") for n in names}
    before = {n: p.detach().clone() for n, p in base.named_parameters()}
    train, held = (torch.randint(3, 64, (8, 12), generator=g) for _ in range(2))

    def held_loss(vals):
        with torch.no_grad():
            w = {n: bp[n] + vals[n].to_dense() for n in names}
            student = torch.func.functional_call(base, w, (held,)).logits
            return float(nn.functional.mse_loss(student, ft(held).logits))

    new, losses = distill_scales(base, ft, values, [train], steps=30, lr=3e-3)
    assert len(losses) == 30 and losses[-1] < 0.9 * losses[0]
    assert held_loss(new) < held_loss(values)                   # and it generalises to unseen tokens
    assert all(isinstance(new[n], BitDelta) and torch.equal(new[n].positive, values[n].positive) for n in names)
    assert sum(new[n].scale != values[n].scale for n in names) == len(names)
    assert all(torch.equal(p, before[n]) and p.grad is None for n, p in base.named_parameters())


@pytest.mark.parametrize("values, kwargs, err, needle", [
    ({"nope.weight": "v"}, {}, TypeError, "expected a BitDelta value for 'nope.weight', found str"),
    ({"nope.weight": None}, {}, TypeError, "expected a BitDelta value"),
    ("missing", {}, KeyError, "expected a parameter of the base model, found 'other.weight'"),
    ("shape", {}, ValueError, "weight: expected shape [4, 6], found [6, 4]"),
    ("ok", {"steps": 0}, ValueError, "expected batches, steps >= 1 and lr > 0"),
])
def test_distillation_bad_input_is_one_line(values, kwargs, err, needle):
    base = nn.Linear(6, 4, bias=False)
    v = compress_tensor(torch.randn(4, 6), "bitdelta")
    values = {"missing": {"other.weight": v}, "shape": {"weight": compress_tensor(torch.randn(6, 4), "bitdelta")},
              "ok": {"weight": v}}.get(values, values) if isinstance(values, str) else values
    with pytest.raises(err) as e:
        distill_scales(base, base, values, [torch.randn(2, 6)], **kwargs)
    assert needle in str(e.value) and "\n" not in str(e.value)
