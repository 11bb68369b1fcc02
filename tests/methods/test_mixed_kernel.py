"""The mixed-adapter LoRA kernel (methods/_mixed.py): every row equals that row run alone through
its own adapter, for mixed ranks, base rows, every layout, both batched forms (gathered per row,
padded per adapter), fp32 / bf16 / autocast, gradients included; plus a hand-worked 2x2 case.
Model-level greedy generation through ``mixed_batch`` is in tests/train/test_generate.py."""
from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
from torch import nn

from deltakit.core.delta import CACHE_PREFIX
from deltakit.methods import _mixed
from deltakit.methods.lora import LoRA, LoraConfig

RANKS = (4, 8, 16, 8, 4)


def _base(kind: str, dtype=torch.float32) -> nn.Module:
    torch.manual_seed(0)
    if kind == "linear":
        m = nn.Linear(12, 10)
    elif kind == "conv1d":
        from transformers.pytorch_utils import Conv1D
        m = Conv1D(10, 12)                      # nf=out, nx=in: weight (in, out)
    elif kind == "embedding":
        m = nn.Embedding(30, 10)
    else:
        m = nn.Conv2d(3, 5, 3, padding=1)
    return m.to(dtype)


def _adapters(base: nn.Module, ranks=RANKS, **cfg) -> list[LoRA]:
    out = []
    for k, r in enumerate(ranks):
        d = LoRA(base, LoraConfig(r=r, alpha=2.0 * r + k, **cfg))   # a different scale for each
        g = torch.Generator().manual_seed(10 + k)
        with torch.no_grad():
            for p in (d.lora_A, d.lora_B):
                p.copy_(torch.randn(p.shape, generator=g) * 0.5)
        out.append(d.eval())
    return out


def _input(kind: str, shape: str, batch: int, dtype=torch.float32) -> torch.Tensor:
    g = torch.Generator().manual_seed(3)
    if kind == "embedding":
        return torch.randint(0, 30, (batch, 5), generator=g)
    if kind == "conv2d":
        return torch.randn(batch, 3, 6, 6, generator=g).to(dtype)
    lead = (batch,) if shape == "2d" else (batch, 5)
    return torch.randn(*lead, 12, generator=g).to(dtype)


def _alone(base, deltas, rows, x) -> torch.Tensor:
    """Each row run by itself through its own adapter's ordinary residual (zero for -1)."""
    outs = []
    for i, k in enumerate(rows):
        y = deltas[max(k, 0)].residual(base, x[i:i + 1])
        outs.append(torch.zeros_like(y) if k < 0 else y)
    return torch.cat(outs)


# rows, with the form each rank group takes on (B, in) inputs
ROWS = {
    "spread": [0, 3, -1, 1, 2, 4, 0, -1, 2],            # every rank, base rows, out of order
    "packed": [1, 1, 3, 3, 1, 3, 1, 3],                 # two rank-8 adapters, 4 rows each: padded form
    "one": [2, 2, -1, 2],                               # one adapter in the batch
    "base": [-1, -1, -1],                               # nothing to compute
}


@pytest.mark.parametrize("kind,shape", [("linear", "2d"), ("linear", "3d"), ("conv1d", "2d"), ("conv1d", "3d"),
                                        ("embedding", "ids"), ("conv2d", "image")])
@pytest.mark.parametrize("case", sorted(ROWS))
def test_each_row_equals_its_adapter_alone_fp32(kind, shape, case):
    base = _base(kind)
    deltas = _adapters(base)
    rows = ROWS[case]
    x = _input(kind, shape, len(rows))
    with torch.no_grad():
        got = LoRA.mixed_residual(base, deltas, torch.tensor(rows), x)
        ref = _alone(base, deltas, rows, x)
        old = LoRA.mixed_residual_concat(base, deltas, torch.tensor(rows), x)
    assert got.shape == ref.shape
    torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(got, old, rtol=1e-5, atol=1e-5)
    for i, k in enumerate(rows):
        if k < 0:
            assert torch.equal(got[i], torch.zeros_like(got[i])), i     # exactly zero
    assert not torch.equal(ref, torch.zeros_like(ref)) or case == "base"


def test_both_batched_forms_are_taken_and_agree(monkeypatch):
    """Decode rows sharing adapters pack per adapter; long distinct rows gather per row."""
    calls = []
    real = _mixed._padded
    monkeypatch.setattr(_mixed, "_padded", lambda *a: calls.append("padded") or real(*a))
    base = _base("linear")
    deltas = _adapters(base, ranks=(8, 8, 8))
    rows = [0, 1, 0, 1, 2, 0, 1, 1]
    for x, expect in ((_input("linear", "2d", 8), ["padded"]), (_input("linear", "3d", 8), [])):
        calls.clear()
        with torch.no_grad():
            got = LoRA.mixed_residual(base, deltas, torch.tensor(rows), x)
        assert calls == expect
        torch.testing.assert_close(got, _alone(base, deltas, rows, x), rtol=1e-5, atol=1e-5)


def test_hand_worked_2x2():
    """in = out = 2. a: r=1, A=[1 2], B=[1 0]^T, s=2; b: r=1, A=[0 1], B=[1 1]^T, s=0.5;
    c: r=2, A=I, B=diag(1, -1), s=1 (a rank group of its own).
    row 0 (a) x=[1 1]: A x = 3, *2 = 6, B -> [6 0]; row 1 base -> [0 0];
    row 2 (b) x=[1 4]: A x = 4, *0.5 = 2, B -> [2 2]; row 3 (c) x=[3 5] -> [3 -5];
    row 4 (a) x=[-1 0.5]: A x = 0, -> [0 0]."""
    def v(A, B, s):
        return SimpleNamespace(lora_A=torch.tensor(A), lora_B=torch.tensor(B), r=len(A), scale=s)
    deltas = [v([[1., 2.]], [[1.], [0.]], 2.0), v([[0., 1.]], [[1.], [1.]], 0.5),
              v([[1., 0.], [0., 1.]], [[1., 0.], [0., -1.]], 1.0)]
    x = torch.tensor([[1., 1.], [2., 3.], [1., 4.], [3., 5.], [-1., 0.5]])
    got = LoRA.mixed_residual(nn.Linear(2, 2), deltas, torch.tensor([0, -1, 1, 2, 0]), x)
    assert torch.equal(got, torch.tensor([[6., 0.], [0., 0.], [2., 2.], [3., -5.], [0., 0.]]))


@pytest.mark.parametrize("kind", ["linear", "conv1d", "embedding"])
@pytest.mark.parametrize("case", ["spread", "packed"])
def test_bf16_factors_and_input(kind, case):
    base = _base(kind, torch.bfloat16)
    deltas = [d.to(torch.bfloat16) for d in _adapters(base)]   # (adapters default to fp32 beside a bf16 base)
    rows = ROWS[case]
    x = _input(kind, "3d", len(rows), torch.bfloat16)
    with torch.no_grad():
        got = LoRA.mixed_residual(base, deltas, torch.tensor(rows), x)
        ref = _alone(base, deltas, rows, x)
    assert got.dtype == ref.dtype == torch.bfloat16
    torch.testing.assert_close(got, ref, rtol=1.6e-2, atol=1e-2)


@pytest.mark.parametrize("compute", ["adapter", "input"])
def test_bf16_input_fp32_factors_under_autocast_and_compute_dtype(compute):
    base = _base("linear", torch.bfloat16)
    deltas = _adapters(base, compute_dtype=compute)
    for d in deltas:
        d.float()
    rows = ROWS["spread"]
    x = _input("linear", "3d", len(rows), torch.bfloat16)
    for autocast in (False, True):
        with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            got = LoRA.mixed_residual(base, deltas, torch.tensor(rows), x)
            ref = _alone(base, deltas, rows, x)
        assert got.dtype == ref.dtype, (compute, autocast)
        tol = 1e-5 if got.dtype == torch.float32 else 1e-2
        torch.testing.assert_close(got, ref, rtol=tol, atol=tol)


@pytest.mark.parametrize("kind", ["linear", "conv1d", "embedding", "conv2d"])
@pytest.mark.parametrize("case", ["spread", "packed"])
def test_gradients_equal_per_adapter_runs(kind, case):
    base = _base(kind)
    rows = ROWS[case]
    shape = "2d" if case == "packed" else "3d"           # 2d packed: the padded form's backward
    x0 = _input(kind, shape, len(rows))
    w = torch.randn(_alone(_base(kind), _adapters(base), rows, x0).shape, generator=torch.Generator().manual_seed(5))

    def grads(fn):
        deltas = _adapters(base)
        x = x0.clone().requires_grad_(x0.is_floating_point())
        (fn(base, deltas, rows, x) * w).sum().backward()
        return [p.grad for d in deltas for p in (d.lora_A, d.lora_B)], x.grad

    got, gx = grads(lambda b, d, r, x: LoRA.mixed_residual(b, d, torch.tensor(r), x))
    ref, rx = grads(_alone)
    for a, b in zip(got, ref):
        if b is None:                                    # an adapter no row uses
            assert a is None or torch.equal(a, torch.zeros_like(a))
        else:
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
    if rx is not None:
        torch.testing.assert_close(gx, rx, rtol=1e-5, atol=1e-5)


def test_cached_stack_follows_in_place_updates():
    """Without autograd the stacked factors are cached on the base; an in-place change to a
    factor (an optimiser step, a reload) bumps its version and must be seen."""
    base = _base("linear")
    deltas = _adapters(base)
    rows = ROWS["spread"]
    x = _input("linear", "3d", len(rows))
    with torch.no_grad():
        first = LoRA.mixed_residual(base, deltas, torch.tensor(rows), x)
        bank = base.__dict__[CACHE_PREFIX + "mixed_bank"][1]
        assert LoRA.mixed_residual(base, deltas, torch.tensor(rows), x).equal(first)
        assert base.__dict__[CACHE_PREFIX + "mixed_bank"][1] is bank          # the second call hit the cache
        deltas[3].lora_B.mul_(-2.0)
        got = LoRA.mixed_residual(base, deltas, torch.tensor(rows), x)
        torch.testing.assert_close(got, _alone(base, deltas, rows, x), rtol=1e-5, atol=1e-5)
    assert not got.equal(first)


def test_bad_rows_name_what_was_expected():
    base = _base("linear")
    deltas = _adapters(base, ranks=(4, 4))
    x = _input("linear", "2d", 3)
    with pytest.raises(ValueError, match="index 2 adapters"):
        LoRA.mixed_residual(base, deltas, torch.tensor([0, 2, -1]), x)
    with pytest.raises(ValueError, match="name 2 rows, the input has 3"):
        LoRA.mixed_residual(base, deltas, torch.tensor([0, 1]), x)


@pytest.mark.parametrize("shape", ["2d", "3d"])
@pytest.mark.parametrize("case", sorted(ROWS))
def test_adding_into_the_base_output_in_place(shape, case):
    """``into``: the base output plus each row's residual, accumulated in place without autograd
    (the buffer passed in is the one returned), out of place with it."""
    base = _base("linear")
    deltas = _adapters(base)
    rows = ROWS[case]
    x = _input("linear", shape, len(rows))
    with torch.no_grad():
        y0 = base(x)
        want = y0 + _alone(base, deltas, rows, x)
        buf = y0.clone()
        got = LoRA.mixed_residual(base, deltas, torch.tensor(rows), x, into=buf)
    assert got.data_ptr() == buf.data_ptr()
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    for i, k in enumerate(rows):
        if k < 0:
            assert torch.equal(got[i], y0[i]), i                       # base rows untouched
    y1 = base(x)
    got = LoRA.mixed_residual(base, deltas, torch.tensor(rows), x, into=y1)
    assert got.data_ptr() != y1.data_ptr() and got.requires_grad
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


# all-distinct decode: every row its own adapter (the bank holds exactly the batch's adapters,
# as under DeltaLayer), in bank order, permuted, with base rows between, over mixed ranks
DISTINCT = {
    "in_order": [0, 1, 2, 3, 4],
    "permuted": [3, 0, 4, 2, 1],
    "base_rows": [4, -1, 1, 0, -1, 3, 2],
}


@pytest.mark.parametrize("shape", ["2d", "3d"])
@pytest.mark.parametrize("case", sorted(DISTINCT))
@pytest.mark.parametrize("into", [False, True])
def test_all_distinct_rows_read_the_bank_without_copying(monkeypatch, shape, case, into):
    """Each rank group's rows line up with its stacked factors, so the bmm reads the bank itself
    (a view: same storage), never an ``index_select`` copy; outputs equal each row alone."""
    seen = []
    real = _mixed._factors

    def spy(g, ks):
        got = real(g, ks)
        seen.append(isinstance(got, tuple) and got[0].untyped_storage().data_ptr() == g.At.untyped_storage().data_ptr()
                    and got[1].untyped_storage().data_ptr() == g.Bt.untyped_storage().data_ptr())
        return got
    monkeypatch.setattr(_mixed, "_factors", spy)
    base = _base("linear")
    deltas = _adapters(base)                             # ranks 4, 8, 16, 8, 4: groups {0, 4}, {1, 3}, {2}
    rows = DISTINCT[case]
    x = _input("linear", shape, len(rows))
    with torch.no_grad():
        y0 = base(x)
        want = _alone(base, deltas, rows, x)
        got = LoRA.mixed_residual(base, deltas, torch.tensor(rows), x, into=y0.clone() if into else None)
    torch.testing.assert_close(got, y0 + want if into else want, rtol=1e-5, atol=1e-5)
    assert seen == [True, True]                          # the two groups of two; rank 16 is one adapter
    for i, k in enumerate(rows):
        if k < 0:
            assert torch.equal(got[i], y0[i] if into else torch.zeros_like(got[i])), i


def test_decode_rows_sharing_adapters_pack_over_a_view_of_the_bank(monkeypatch):
    """The padded form (decode, several rows per adapter) reads each adapter present once: a view
    when they are consecutive in the bank, a copy of just those otherwise; both equal each row alone."""
    seen = []
    real = _mixed._factors
    monkeypatch.setattr(_mixed, "_factors", lambda g, ks: seen.append((list(ks), isinstance(real(g, ks), tuple)))
                        or real(g, ks))
    base = _base("linear")
    deltas = _adapters(base, ranks=(8, 8, 8, 8))
    x = _input("linear", "2d", 8)
    for rows, ks in (([2, 1, 1, 2, -1, 1, 2, 2], ([1, 2], True)), ([3, 0, 0, 3, 3, 0, -1, 0], ([0, 3], False))):
        seen.clear()
        with torch.no_grad():
            got = LoRA.mixed_residual(base, deltas, torch.tensor(rows), x)
        assert seen == [ks]
        torch.testing.assert_close(got, _alone(base, deltas, rows, x), rtol=1e-5, atol=1e-5)
    assert _mixed._span([1, 2]) == slice(1, 3) and _mixed._span([0, 3]) is None


def test_all_distinct_decode_through_mixed_batch_equals_each_row_alone():
    """Model level, as the serving engine runs decode: a mixed batch of one-token rows, each
    row its own adapter (mixed ranks, permuted against attach order, base rows), equals every
    row run alone with its adapter active."""
    import deltakit as dk

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(12, 16), nn.ReLU(), nn.Linear(16, 12)).eval()
    names = [f"a{k}" for k in range(5)]
    for k, n in enumerate(names):
        ad = dk.attach(model, dk.LoraConfig(r=RANKS[k], alpha=2.0 * RANKS[k] + k, targets=("0", "2")), name=n)
        g = torch.Generator().manual_seed(20 + k)
        with torch.no_grad():
            for _, d in ad.deltas():
                for p in (d.lora_A, d.lora_B):
                    p.copy_(torch.randn(p.shape, generator=g) * 0.5)
    rows = ["a3", None, "a0", "a4", "a2", None, "a1"]
    x = _input("linear", "3d", len(rows))[:, :1]         # (B, 1, in): one token per row
    with torch.no_grad():
        with dk.mixed_batch(model, rows):
            got = model(x)
        for i, n in enumerate(rows):
            if n is None:
                with dk.disabled(model):
                    want = model(x[i:i + 1])
            else:
                dk.set_active(model, [n])
                want = model(x[i:i + 1])
            torch.testing.assert_close(got[i:i + 1], want, rtol=1e-5, atol=1e-5)


def test_row_plans_are_kept_per_rows_and_follow_a_rebuilt_bank():
    """The per-group plan is made once per (rows, tokens per row) and reused by the next call
    with the same rows (a decode step); other rows plan anew; an in-place factor update
    rebuilds the bank and with it the plans. Every answer equals each row alone."""
    base = _base("linear")
    deltas = _adapters(base)
    x = _input("linear", "2d", 5)
    with torch.no_grad():
        for rows in ([3, 0, 4, 2, 1], [1, 1, -1, 4, 1], [3, 0, 4, 2, 1]):
            got = LoRA.mixed_residual(base, deltas, torch.tensor(rows), x)
            torch.testing.assert_close(got, _alone(base, deltas, rows, x), rtol=1e-5, atol=1e-5)
        bank = base.__dict__[CACHE_PREFIX + "mixed_bank"][1]
        assert len(bank.plans) == 2                                  # the repeated rows reused their plan
        deltas[0].lora_A.mul_(3.0)
        rows = [3, 0, 4, 2, 1]
        got = LoRA.mixed_residual(base, deltas, torch.tensor(rows), x)
        assert base.__dict__[CACHE_PREFIX + "mixed_bank"][1] is not bank
        torch.testing.assert_close(got, _alone(base, deltas, rows, x), rtol=1e-5, atol=1e-5)


def test_rows_are_reordered_only_where_the_activations_are_the_smaller_copy():
    """One rank group holding the whole batch, each row its own adapter, out of order: at decode
    (L = 1 < r) the rows are permuted to line up with the bank (a view, no factor copy); with
    long rows (L = 12 >= r = 8) they keep their order (the activations would be the bigger copy)
    and the factors are gathered. Both equal each row alone."""
    base = _base("linear")
    deltas = _adapters(base, ranks=(8, 8, 8, 8))
    rows = [2, 0, 3, 1]
    g = torch.Generator().manual_seed(4)
    for L, sel_none, view in ((1, False, True), (12, True, False)):
        x = torch.randn(4, L, 12, generator=g)
        with torch.no_grad():
            got = LoRA.mixed_residual(base, deltas, torch.tensor(rows), x)
        plans = base.__dict__[CACHE_PREFIX + "mixed_bank"][1].plans          # (rows, L, device) -> runs
        (run,) = next(v for k, v in plans.items() if k[1] == L)
        assert (run.sel is None, isinstance(run.factors, tuple)) == (sel_none, view), L
        torch.testing.assert_close(got, _alone(base, deltas, rows, x), rtol=1e-5, atol=1e-5)
