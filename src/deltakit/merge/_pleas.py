"""PLeaS: merging two models with permutations and least squares (Nasery et al., 2024,
"PLeaS: Merging Models with Permutations and Least Squares") https://arxiv.org/abs/2407.02447

Two models of one architecture (different initialisations or tasks allowed) are merged in two
steps, from activations on data:

1. Permutations: at every hidden layer l the units of A and B are matched by the correlation
   of their activations (Hungarian assignment maximising ``sum_i corr(a_i, b_pi(i))``, as in
   Git Re-Basin's activation matching). Partial merging: only the ``m_l = round(ratio_l * d_l)``
   best-correlated pairs are merged; the other ``d_l - m_l`` units of each model are kept
   side by side, so layer l of the merged model has ``m_l + 2 (d_l - m_l)`` units
   (ratio 1: the original width; ratio 0: both models side by side).
2. Least squares, layer by layer: the merged layer's weights solve
   ``min_W || [X_m, X_A, X_B, 1] W^T - [(Y_A + Y_B) / 2 | Y_A | Y_B] ||^2`` (merged, A-only, B-only
   units),
   where X are the layer's inputs and Y its pre-activation outputs in the ORIGINAL models
   (permuted into the merged layout; merged input units take the mean of the pair), and the
   blocks that would feed A-only inputs into B-only outputs (and B into A) are held at 0.
   The output layer's target is the mean of the two models' outputs.

Deliberate differences from the authors' code: (a) the least-squares problems are solved in
closed form (``torch.linalg.lstsq``, one per output block) where the release runs Adam on the
same masked MSE; (b) one ``ratio`` per layer is given (or one for all), where the paper can
also spread a global budget over layers by a quadratic programme; (c) the architecture is an
``nn.Sequential`` chain of ``nn.Linear`` layers and parameter-free elementwise modules (MLPs),
where the release compiles permutation specs for ResNets: the matching and least squares
above are the paper's, the graph coverage is smaller. Needs scipy (the Hungarian assignment).
"""
from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import torch
from torch import nn

__all__ = ["pleas_merge", "PleasResult", "match_units"]

_ELEMENTWISE = (nn.ReLU, nn.GELU, nn.Tanh, nn.Sigmoid, nn.SiLU, nn.LeakyReLU, nn.ELU, nn.Identity, nn.Dropout)


@dataclass
class _Axis:
    """One hidden layer's layout in the merged model: unit indices into A and B."""
    a_merged: torch.Tensor
    b_merged: torch.Tensor
    a_only: torch.Tensor
    b_only: torch.Tensor

    @property
    def width(self) -> int:
        return len(self.a_merged) + len(self.a_only) + len(self.b_only)


@dataclass
class PleasResult:
    model: nn.Sequential              # the merged model (wider where ratio < 1)
    widths: list[int]                 # hidden widths of the merged model
    correlations: list[torch.Tensor]  # per hidden layer: corr(a_i, b_pi(i)) of every matched pair, best first


def match_units(feats_a: torch.Tensor, feats_b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Hungarian matching of units by activation correlation. feats (N, d) ->
    (pi (d,) with unit i of A matched to unit pi[i] of B, corr(a_i, b_pi(i)) (d,))."""
    from scipy.optimize import linear_sum_assignment

    za = (feats_a - feats_a.mean(0)) / feats_a.std(0).clamp_min(1e-8)
    zb = (feats_b - feats_b.mean(0)) / feats_b.std(0).clamp_min(1e-8)
    corr = (za.T.double() @ zb.double()) / (feats_a.shape[0] - 1)  # (d, d)
    rows, cols = linear_sum_assignment(corr.detach().numpy(), maximize=True)
    pi = torch.as_tensor(cols)[torch.as_tensor(rows).argsort()]
    return pi, corr.detach()[torch.arange(len(pi)), pi].float()


def _check_chain(a: nn.Sequential, b: nn.Sequential) -> list[int]:
    """Positions of the Linear layers; everything else must be a parameter-free elementwise module."""
    if not isinstance(a, nn.Sequential) or not isinstance(b, nn.Sequential) or len(a) != len(b):
        raise ValueError("pleas: expected two nn.Sequential models of the same length")
    linears = []
    for i, (ma, mb) in enumerate(zip(a, b)):
        if type(ma) is not type(mb):
            raise ValueError(f"pleas: layer {i}: expected the same module in both models, found "
                             f"{type(ma).__name__} and {type(mb).__name__}")
        if isinstance(ma, nn.Linear):
            if ma.weight.shape != mb.weight.shape or (ma.bias is None) != (mb.bias is None):
                raise ValueError(f"pleas: layer {i}: expected equal shapes, found {tuple(ma.weight.shape)} "
                                 f"and {tuple(mb.weight.shape)}")
            linears.append(i)
        elif not isinstance(ma, _ELEMENTWISE):
            raise ValueError(f"pleas: layer {i}: expected nn.Linear or an elementwise activation, "
                             f"found {type(ma).__name__}")
    if not linears:
        raise ValueError("pleas: expected at least one nn.Linear, found none")
    return linears


def _io(model: nn.Sequential, linears: list[int], batches: Sequence[torch.Tensor]) -> list[tuple]:
    """Per Linear: (inputs (N, in), pre-activation outputs (N, out)) over all batches, fp64."""
    got: dict[int, list] = {i: [[], []] for i in linears}

    def keep(i: int):
        def hook(mod: nn.Module, args: tuple, out: torch.Tensor) -> None:
            got[i][0].append(args[0].detach().double())
            got[i][1].append(out.detach().double())
        return hook

    hooks = [model[i].register_forward_hook(keep(i)) for i in linears]
    try:
        with torch.no_grad():
            for x in batches:
                model(x)
    finally:
        for h in hooks:
            h.remove()
    return [(torch.cat(got[i][0]), torch.cat(got[i][1])) for i in linears]


def _axis(pi: torch.Tensor, corr: torch.Tensor, ratio: float) -> _Axis:
    d = len(pi)
    m = int(round(ratio * d))
    order = torch.argsort(corr, descending=True, stable=True)
    merged, rest = order[:m].sort().values, order[m:].sort().values
    b_rest = torch.as_tensor(sorted(set(range(d)) - set(pi[merged].tolist())), dtype=torch.long)
    return _Axis(merged, pi[merged], rest, b_rest)


def _layout(t_a: torch.Tensor, t_b: torch.Tensor, ax: _Axis | None) -> tuple[torch.Tensor, ...]:
    """Columns of (N, d) activations in the merged layout: (mean of merged pairs, A-only, B-only)."""
    if ax is None:  # the model input, or the shared output: one set of units
        return ((t_a + t_b) / 2,)
    return ((t_a[:, ax.a_merged] + t_b[:, ax.b_merged]) / 2, t_a[:, ax.a_only], t_b[:, ax.b_only])


def _solve(x_blocks: tuple[torch.Tensor, ...], y_blocks: tuple[torch.Tensor, ...], bias: bool) -> tuple:
    """The masked least squares of one layer -> (W (out, in), b (out,) or None), merged layout."""
    n = x_blocks[0].shape[0]
    ones = [torch.ones(n, 1, dtype=torch.float64)] if bias else []
    in_sizes = [x.shape[1] for x in x_blocks]
    starts = [sum(in_sizes[:k]) for k in range(len(in_sizes))]
    rows_w, rows_b = [], []
    for k, y in enumerate(y_blocks):
        if y.shape[1] == 0:  # no units in this block (ratio 1: no unmatched units; ratio 0: none merged)
            continue
        # output block k may read the merged inputs and its own model's inputs, never the other's
        allowed = [0] if len(x_blocks) == 1 else ([0, 1, 2] if k == 0 else [0, k])
        design = torch.cat([x_blocks[j] for j in allowed] + ones, 1)
        sol = torch.linalg.lstsq(design, y).solution.T  # (out_k, p)
        w = torch.zeros(y.shape[1], sum(in_sizes), dtype=torch.float64)
        at = 0
        for j in allowed:
            w[:, starts[j]:starts[j] + in_sizes[j]] = sol[:, at:at + in_sizes[j]]
            at += in_sizes[j]
        rows_w.append(w)
        rows_b.append(sol[:, at] if bias else None)
    return torch.cat(rows_w), (torch.cat(rows_b) if bias else None)  # blocks in layout order


def pleas_merge(model_a: nn.Sequential, model_b: nn.Sequential, batches: Iterable[torch.Tensor], *,
                ratio: float | Sequence[float] = 1.0) -> PleasResult:
    """Merge two MLPs from activations on ``batches`` (inputs, as the models take them).

    ``ratio``: the fraction of each hidden layer's units merged (one value, or one per hidden
    layer); 1 gives a model of the original size, less keeps unmatched units of both.
    Neither input model is modified. Needs at least as many examples as the widest layer's
    input (+1) for the least squares to be determined.
    """
    linears = _check_chain(model_a, model_b)
    data = list(batches)
    if not data:
        raise ValueError("pleas: expected at least one batch, found none")
    ratios = [float(ratio)] * (len(linears) - 1) if isinstance(ratio, (int, float)) else [float(r) for r in ratio]
    if len(ratios) != len(linears) - 1 or any(not 0 <= r <= 1 for r in ratios):
        raise ValueError(f"pleas: ratio: expected {len(linears) - 1} fractions in [0, 1], found {ratio}")
    io_a, io_b = _io(model_a, linears, data), _io(model_b, linears, data)
    # the unit activations of hidden layer l are the inputs of Linear l+1 (after the elementwise ops)
    axes: list[_Axis | None] = [None]
    corrs = []
    for l, r in enumerate(ratios):
        pi, c = match_units(io_a[l + 1][0].float(), io_b[l + 1][0].float())
        axes.append(_axis(pi, c, r))
        corrs.append(c.sort(descending=True).values)
    axes.append(None)
    merged = nn.Sequential(*[_copy_elementwise(m) for m in model_a])
    for l, pos in enumerate(linears):
        src = model_a[pos]
        x_blocks = _layout(io_a[l][0], io_b[l][0], axes[l])
        y_blocks = _layout(io_a[l][1], io_b[l][1], axes[l + 1])
        w, b = _solve(x_blocks, y_blocks, src.bias is not None)
        lin = nn.Linear(w.shape[1], w.shape[0], bias=src.bias is not None, dtype=src.weight.dtype)
        with torch.no_grad():
            lin.weight.copy_(w)
            if b is not None:
                lin.bias.copy_(b)
        merged[pos] = lin
    return PleasResult(merged, [ax.width for ax in axes[1:-1]], corrs)


def _copy_elementwise(m: nn.Module) -> nn.Module:
    import copy

    return copy.deepcopy(m) if not isinstance(m, nn.Linear) else nn.Identity()
