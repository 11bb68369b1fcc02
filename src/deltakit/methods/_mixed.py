"""The mixed-adapter LoRA kernel: every row of a batch with its own adapter, in one pass whose
cost does not grow with the number of distinct adapters (what ``deltakit.mixed_batch`` runs on
every LoRA-family layer; Punica's SGMV idea, https://arxiv.org/abs/2310.18547, in plain torch).

Row ``i`` of the output is ``s_k * B_k A_k x_i`` for its adapter ``k = row[i]`` (zero for
``row[i] == -1``, the base). The older path (``LoRA.mixed_residual_concat``) ran every row
through every adapter's factors concatenated (rank ``sum_k r_k``) and masked the columns, so
32 adapters cost 32 LoRAs per row. Here:

* Adapters are grouped by rank (few distinct ranks in practice). A group's factors are stacked
  once, transposed for ``bmm``: ``At`` (K_g, in, r), ``Bt`` (K_g, r, out), cached on the base
  module without autograd (keyed by the factor tensors and their version counters, as
  ``_stacked`` is), so decoding does not re-stack at every step. Ranks are never padded:
  each group runs at its own rank.
* Per group, either each row gathers its own adapter's factors (``index_select``) and one
  ``bmm`` runs all of them ("gathered": ``n * L * r * (in + out)`` multiply-adds for its ``n``
  rows of ``L`` tokens, plus a copy of ``n * r * (in + out)`` factor values), or the rows are
  packed per distinct adapter into a zero-padded ``(U, maxc * L, in)`` block and one ``bmm``
  runs the ``U`` adapters present ("padded": ``U * maxc * L * r * (in + out)``, a factor copy
  of only ``U * r * (in + out)``, but the activations are copied in and out). With a rank as
  small as LoRA's, both are bound by memory traffic, so the choice counts values moved:
  gathered ``n * L + 2 * n * r``, padded ``(U * maxc + 2 * n) * L + 2 * U * r`` (times
  ``in + out``); padded wins iff ``(U * maxc + n) * L < 2 * r * (n - U)``. Long rows (prefill)
  therefore gather: the copy is ~r/L of the work and nothing is padded. Decode (L = 1) with
  several rows per adapter packs, reading each distinct adapter's factors once. A group whose
  rows all use one adapter runs two plain matmuls. No form depends on how many adapters
  exist, only on the rows in the batch.
* No factor copy where the rows line up with the bank. A group's rows are ordered by their
  adapter's place in the stack (the small activations are permuted, not the factors); when
  the adapters a form needs are then consecutive there, ``bmm`` reads a view of the bank
  instead of an ``index_select`` copy, which the cost model above still charges (so it stays
  conservative). That is the serving decode step: :class:`~deltakit.core.layer.DeltaLayer`
  hands the kernel exactly the batch's adapters, so with every row its own adapter each group
  is its whole stack, read once (the copy made it three times: copy out, write, read back),
  and the padded form reads the ``U`` adapters present as a view too.
* The plan per rank group (its rows, form, factor views or indices, padding slots) is made
  once per ``(rows, tokens per row)`` and kept on the cached bank: decode repeats the last
  step's rows on every layer, and re-planning them in Python was most of the single-adapter
  overhead. A change of the batch's adapters re-stacks the bank once per layer (a step that
  costs about what the copying form did).
* Without autograd or autocast, the last matmul accumulates straight into the base output
  (``baddbmm_`` / ``addmm_`` / ``index_add_``; ``into=``), saving a full-size residual, its
  read-back and the sum's allocation: on MiniLM that add cost as much as the kernel itself.
* Rows of the base (-1) are never computed; their output is exactly zero.
* ``nn.Embedding`` and ``nn.Conv2d`` targets take a correct, simpler path: one ordinary LoRA
  residual per distinct adapter present, over that adapter's rows (a loop over adapters,
  never over rows). An embedding is one layer per model, and a conv's im2col makes a
  batched per-row kernel awkward.

The row plan (which rows go to which group, the padding slots) is made on the host from
``row``; :class:`~deltakit.core.layer.DeltaLayer` passes a CPU ``row``, so a CUDA forward
syncs nothing. A ``row`` on an accelerator works too, at the price of one device sync.

What changes against running each row alone: only floating-point rounding. ``bmm`` over a
stacked batch blocks its sums differently from one ``matmul`` per row (each still runs over the
row's own ``r`` columns), and with ``into=`` the base output is added inside the matmul's
accumulation instead of after rounding the residual. The scale multiplies the rank-``r``
activations as :meth:`LoRA.residual` does (fp32 opmath, rounded to the branch dtype). Against
the concatenating path the sums also lose the other adapters' zero-weighted columns. Tests hold
every row to the row run alone at 1e-5 (fp32).
"""
from __future__ import annotations

import functools
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

from ..core.delta import CACHE_PREFIX
from .lora import _autocast_keeps, _cast, _compute_factors, _down, _same_key, _up

__all__ = ["mixed_lora_residual"]


@dataclass(frozen=True)
class _Group:
    """The stacked factors of the adapters sharing one rank."""

    At: Tensor        # (K_g, in, r)
    Bt: Tensor        # (K_g, r, out)
    scales: Tensor    # (K_g,) fp32


@dataclass(frozen=True)
class _Bank:
    groups: tuple[_Group, ...]
    where: tuple[tuple[int, int], ...]   # adapter k -> (group, index in the group)
    plans: dict = field(default_factory=dict, compare=False)   # (rows, L, device) -> runs (_runs)


def mixed_lora_residual(base: nn.Module, deltas: Sequence, row: Tensor, x: Tensor,
                        into: Tensor | None = None) -> Tensor:
    """``res[i] = s_k * B_k A_k x[i]`` with ``k = row[i]`` (0 where ``row[i] == -1``); with
    ``into`` (the base output), ``into + res`` instead.

    deltas: objects with ``lora_A`` (r_k, in[, kh, kw]), ``lora_B`` (out, r_k[, 1, 1]) and
    ``scale`` (LoRA, or the bank methods' views); row: (B,) long; x: (B, ..., in), token ids
    (B, T) for an embedding, (B, C, H, W) for a conv. Returns (B, ..., out) in the branch dtype
    (``into``'s dtype when given).

    Why ``into``: without autograd the last matmul accumulates straight into the base output
    (``baddbmm_``), which saves writing the (B, ..., out) residual, reading it back and a
    third full-size tensor for the sum: on MiniLM that add cost as much as the kernel.
    """
    rows = row.tolist()
    if len(rows) != x.shape[0]:
        raise ValueError(f"mixed rows name {len(rows)} rows, the input has {x.shape[0]}")
    bad = [k for k in rows if not -1 <= k < len(deltas)]
    if bad:
        raise ValueError(f"mixed rows index {len(deltas)} adapters (or -1 for the base); found {bad[:5]}")
    if not isinstance(base, (nn.Conv2d, nn.Embedding)):
        bank = _bank(base, deltas, x)
        if _fusable(into, x, bank):
            return _batched(bank, rows, x, into)
        res = _batched(bank, rows, x)
    else:
        res = _per_adapter(base, deltas, rows, x)
    return res if into is None else into + res.to(into.dtype)


def _fusable(into: Tensor | None, x: Tensor, bank: _Bank) -> bool:
    """Accumulate in place only where nothing can notice: no autograd, no autocast (whose
    dtype choice in-place ops do not follow), one dtype throughout, a contiguous output."""
    dt = bank.groups[0].At.dtype
    return (into is not None and not torch.is_grad_enabled() and not torch.is_autocast_enabled(x.device.type)
            and into.dtype == dt and (x.dtype == dt or not x.is_floating_point()) and into.is_contiguous()
            and into.shape[:-1] == x.shape[:-1] and into.shape[-1] == bank.groups[0].Bt.shape[-1])


# ----------------------------------------------------------------------------- matmul layouts
def _batched(bank: _Bank, rows: list[int], x: Tensor, into: Tensor | None = None) -> Tensor:
    """Linear, Conv1D and packed-linear targets: one or two ``bmm`` per rank group, adding
    into ``into`` in place when given (see :func:`_fusable`)."""
    like = bank.groups[0].At
    xc = x if _autocast_keeps(x) else _cast(x, like)
    x3 = xc.reshape(x.shape[0], -1, x.shape[-1])        # (B, L, in)
    acc = None if into is None else into.view(x3.shape[0], x3.shape[1], into.shape[-1])
    runs = _runs(bank, rows, x3.shape[1], x.device)
    if len(runs) == 1 and runs[0].sel is None:            # one group, every row in order: no gather
        y = _group_residual(x3, runs[0], acc)
        return y.reshape(*x.shape[:-1], y.shape[-1])
    out = acc
    xz = None                                             # x3 and a zero row: the padded form's source
    for run in runs:
        if run.form == "padded":
            xz = _with_zero_row(x3) if xz is None else xz
            y = _padded(xz, run)
        else:
            y = _group_residual(x3.index_select(0, run.sel), run)
        if out is None:
            out = y.new_zeros((x3.shape[0], *y.shape[1:]))
        if acc is not None:
            out.index_add_(0, run.sel, y)
        else:
            out.index_copy_(0, run.sel, y)
    if out is None:                                       # every row is the base
        out = x3.new_zeros((x3.shape[0], x3.shape[1], bank.groups[0].Bt.shape[-1]), dtype=like.dtype)
    return out.reshape(*x.shape[:-1], out.shape[-1])


@dataclass(frozen=True)
class _Run:
    """One rank group's share of a batch, decided once per (rows, tokens per row) and kept on
    the bank: a decode step repeats the previous step's rows, and re-planning them on every
    one of a model's layers was most of the single-adapter decode overhead."""

    group: _Group
    sel: Tensor | None            # (n,) the batch rows it takes; None: every row, in order
    loc: list[int]                # each row's adapter, as an index into the group
    form: str                     # "one" (a single adapter), "padded" or "gathered"
    factors: tuple[Tensor, Tensor, Tensor] | Tensor   # views of the bank (scales (K, 1, 1)), or indices
    slot: Tensor | None = None    # "padded": each row's place in the (U * maxc) block
    src: Tensor | None = None     # "padded": each place's batch row (B: the zero row after the batch)


def _runs(bank: _Bank, rows: list[int], L: int, dev: torch.device) -> tuple[_Run, ...]:
    """The batch's :class:`_Run` per rank group, cached on the bank (a few row lists at a time:
    the prefill and the decode rows of a serving step)."""
    key = (tuple(rows), L, dev)
    hit = bank.plans.get(key)
    if hit is None:
        if len(bank.plans) >= 8:
            bank.plans.clear()
        plan = _plan(bank, rows, L)
        whole = len(plan) == 1 and plan[0][1] == list(range(len(rows)))
        hit = bank.plans[key] = tuple(_make_run(bank.groups[g], sel, whole, loc, len(rows), L, dev)
                                      for g, sel, loc in plan)
    return hit


def _make_run(g: _Group, sel: list[int], whole: bool, loc: list[int], batch: int, L: int,
              dev: torch.device) -> _Run:
    """Choose the group's form by the cost model of the module docstring."""
    n, uniq = len(loc), sorted(set(loc))
    sel_t = None if whole else torch.tensor(sel, device=dev)
    if len(uniq) == 1:
        k = uniq[0]
        return _Run(g, sel_t, loc, "one", (g.At[k], g.Bt[k], g.scales[k]))
    maxc = max(loc.count(k) for k in uniq)
    if (len(uniq) * maxc + n) * L < 2 * g.At.shape[-1] * (n - len(uniq)):
        seg = {k: s for s, k in enumerate(uniq)}
        fill = [0] * len(uniq)
        slots = []
        for k in loc:
            slots.append(seg[k] * maxc + fill[seg[k]])
            fill[seg[k]] += 1
        src = [batch] * (len(uniq) * maxc)               # padding reads the zero row after the batch
        for i, sl in zip(sel, slots):
            src[sl] = i
        return _Run(g, sel_t, loc, "padded", _factors(g, uniq), torch.tensor(slots, device=dev),
                    torch.tensor(src, device=dev))
    return _Run(g, sel_t, loc, "gathered", _factors(g, loc))


def _plan(bank: _Bank, rows: list[int], L: int) -> list[tuple[int, list[int], list[int]]]:
    """Per rank group present: ``(group, the batch rows in it, each row's index in the group)``.

    A group whose rows name distinct adapters is ordered by their place in the stack, so that
    they line up with the bank itself and the kernel permutes the small activations instead of
    copying the big factors (see :func:`_factors`). Only where the activations are the smaller
    copy: a group that is the whole batch in order and has long rows (``L >= r``, prefill)
    keeps its order, since permuting it would gather ``n * L`` rows to save ``n * r``."""
    by_group: dict[int, tuple[list[int], list[int]]] = {}
    for i, k in enumerate(rows):
        if k < 0:
            continue
        g, j = bank.where[k]
        sel, loc = by_group.setdefault(g, ([], []))
        sel.append(i)
        loc.append(j)
    plan = []
    for g, (sel, loc) in by_group.items():
        whole = len(by_group) == 1 and len(sel) == len(rows)
        if len(set(loc)) == len(loc) and (L < bank.groups[g].At.shape[-1] or not whole):
            sel, loc = map(list, zip(*sorted(zip(sel, loc), key=lambda p: p[1])))
        plan.append((g, sel, loc))
    return plan


def _group_residual(x3: Tensor, run: _Run, acc: Tensor | None = None) -> Tensor:
    """``(n, L, in) -> (n, L, out)``: row ``i`` through the group's adapter ``run.loc[i]``;
    added into ``acc`` (n, L, out) in place when given."""
    if run.form == "one":                                 # one adapter: plain matmuls, as LoRA.residual
        At, Bt, s = run.factors
        h = _scaled(x3 @ At, s)
        if acc is None:
            return h @ Bt
        acc.view(-1, acc.shape[-1]).addmm_(h.view(-1, h.shape[-1]), Bt)
        return acc
    if run.form == "padded":
        y = _padded(_with_zero_row(x3), run)
        return y if acc is None else acc.add_(y)
    At, Bt, s = _take(run.group, run.factors)
    h = _scaled(torch.bmm(x3, At), s)
    return torch.bmm(h, Bt) if acc is None else acc.baddbmm_(h, Bt)


def _span(ks: list[int]) -> slice | None:
    """The slice ``ks`` covers when it is consecutive and ascending (a view of the bank), else None."""
    return slice(ks[0], ks[0] + len(ks)) if ks == list(range(ks[0], ks[0] + len(ks))) else None


def _factors(g: _Group, ks: list[int]) -> tuple[Tensor, Tensor, Tensor] | Tensor:
    """The group's adapters ``ks``, one per batch entry of the ``bmm``: ``(At, Bt, scales)``
    views of the bank when ``ks`` is consecutive, else the indices to gather them by.

    Why a view when it can: at decode with every row its own adapter (a serving batch, whose
    bank holds exactly the batch's adapters), ``ks`` is the whole group in order, and
    ``index_select`` would copy every factor only for ``bmm`` to read the copy again: three
    times the adapter bytes of the memory-traffic bound instead of once."""
    span = _span(ks)
    if span is not None:
        return g.At[span], g.Bt[span], g.scales[span, None, None]
    return torch.tensor(ks, device=g.At.device)


def _take(g: _Group, factors: tuple[Tensor, Tensor, Tensor] | Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """``(At, Bt, scales)`` from :func:`_factors`: the views, or a fresh gather (never cached:
    a kept copy would hold ``n * r * (in + out)`` values per layer between calls)."""
    if isinstance(factors, tuple):
        return factors
    return g.At.index_select(0, factors), g.Bt.index_select(0, factors), g.scales.index_select(0, factors)[:, None, None]


def _padded(xz: Tensor, run: _Run) -> Tensor:
    """Rows packed per distinct adapter, zero-padded to the largest count: each adapter
    present is read once (decode, where a row is one token). ``xz``: the batch's (B, L, in)
    rows and a zero row after them (the padding's source); returns the run's rows (n, L, out)."""
    At, Bt, s = _take(run.group, run.factors)
    U, fan_in = At.shape[0], xz.shape[-1]
    xp = xz.index_select(0, run.src)                                                 # (U*maxc, L, in)
    h = _scaled(torch.bmm(xp.view(U, -1, fan_in), At), s)                           # (U, maxc*L, r)
    y = torch.bmm(h, Bt)                                                             # (U, maxc*L, out)
    return y.view(run.src.shape[0], xz.shape[1], y.shape[-1]).index_select(0, run.slot)


def _with_zero_row(x3: Tensor) -> Tensor:
    return torch.cat([x3, x3.new_zeros((1, *x3.shape[1:]))])


def _scaled(h: Tensor, s: Tensor) -> Tensor:
    """``h * s`` in fp32 opmath, rounded to ``h``'s dtype: what ``h * python_float`` does in
    :meth:`LoRA.residual`, so a bf16 branch rounds the same way."""
    return h * s if h.dtype == s.dtype else (h.float() * s).to(h.dtype)


def _bank(base: nn.Module, deltas: Sequence, x: Tensor) -> _Bank:
    """The stacked factors per rank group, cached on ``base`` when autograd is off (keyed like
    ``lora._stacked``: the factor tensors themselves and their version counters, so an
    optimiser step or a reload misses; a different set of adapters in the batch re-stacks
    once per layer)."""
    key = None
    if not torch.is_grad_enabled():
        key = (x.dtype, [(d.lora_A, d.lora_A._version, d.lora_B, d.lora_B._version) for d in deltas])
        hit = base.__dict__.get(CACHE_PREFIX + "mixed_bank")
        if hit is not None and _same_key(hit[0], key):
            return hit[1]
    bank = _build_bank(deltas, x)
    if key is not None:
        base.__dict__[CACHE_PREFIX + "mixed_bank"] = (key, bank)
    return bank


def _build_bank(deltas: Sequence, x: Tensor) -> _Bank:
    pairs = [_compute_factors(d, x) for d in deltas]
    dt = functools.reduce(torch.promote_types, [t.dtype for p in pairs for t in p])
    members: dict[int, list[int]] = {}
    for k, (A, _) in enumerate(pairs):
        members.setdefault(int(A.shape[0]), []).append(k)
    groups, where = [], [(0, 0)] * len(deltas)
    for gi, ks in enumerate(members.values()):
        At = torch.stack([pairs[k][0].to(dt).t() for k in ks])   # stack copies: contiguous (K_g, in, r)
        Bt = torch.stack([pairs[k][1].to(dt).t() for k in ks])   # (K_g, r, out)
        scales = torch.tensor([float(deltas[k].scale) for k in ks], dtype=torch.float32, device=At.device)
        groups.append(_Group(At, Bt, scales))
        for j, k in enumerate(ks):
            where[k] = (gi, j)
    return _Bank(tuple(groups), tuple(where))


# ----------------------------------------------------------------------------- conv2d / embedding
def _per_adapter(base: nn.Module, deltas: Sequence, rows: list[int], x: Tensor) -> Tensor:
    """One ordinary LoRA residual per distinct adapter present, over its own rows."""
    out = None
    for k in sorted({k for k in rows if k >= 0}):
        idx = torch.tensor([i for i, r in enumerate(rows) if r == k], device=x.device)
        y = _one(base, deltas[k], x.index_select(0, idx))
        if out is None:
            out = y.new_zeros((x.shape[0], *y.shape[1:]))
        out.index_copy_(0, idx, y)
    if out is None:                                       # every row is the base: shape from an empty run
        y = _one(base, deltas[0], x[:0])
        out = y.new_zeros((x.shape[0], *y.shape[1:]))
    return out


def _one(base: nn.Module, d, x: Tensor) -> Tensor:
    """:meth:`LoRA.residual` without dropout (the mixed path never runs with it)."""
    A, B = _compute_factors(d, x)
    if not _autocast_keeps(x):
        x = _cast(x, A)
    return _up(base, _down(base, x, A) * d.scale, B)
