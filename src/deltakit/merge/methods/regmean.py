"""RegMean (Jin et al., 2023) https://arxiv.org/abs/2212.09849

For a linear layer y = x W^T with W (out, in) and input Gram G_k = X_k^T X_k (in, in):
``W = (sum_k W_k G~_k)(sum_k G~_k)^-1`` with ``G~ = alpha G + (1 - alpha) diag(G)``
(``ctx.stats["gram"]`` (K, in, in); collect with :func:`deltakit.merge.collect_grams`).
Tensors without a Gram (biases, norms, embeddings) fall back to the plain mean; a merge
run with no Gram at all is an error (it would be plain averaging under another name).
"""
from dataclasses import dataclass

import torch

from ...core.fields import Checked, knob
from .._registry import MergeContext, register_merge


@dataclass(frozen=True)
class RegMeanConfig(Checked):
    alpha: float = knob(0.9, ge=0, le=1, doc="off-diagonal shrinkage of the Grams (the paper searches 0.1..1)")


@register_merge("regmean", paper="https://arxiv.org/abs/2212.09849", config=RegMeanConfig, inputs="weights",
                uses_stats=("gram",))
def regmean(x: torch.Tensor, base: torch.Tensor, cfg: RegMeanConfig, ctx: MergeContext) -> torch.Tensor:
    g = ctx.stats.get("gram")
    if g is None or x.dim() != 3:
        return x.mean(0)
    k, out_f, in_f = x.shape
    if tuple(g.shape) != (k, in_f, in_f):
        raise ValueError(f"regmean: expected gram shape {(k, in_f, in_f)}, found {tuple(g.shape)}")
    work = torch.float64  # Gram matrices are badly conditioned; solve in double
    g = g.to(work)
    diag = torch.diag_embed(torch.diagonal(g, dim1=-2, dim2=-1))
    g = cfg.alpha * g + (1 - cfg.alpha) * diag
    lhs = torch.einsum("koi,kij->oj", x.to(work), g)  # sum_k W_k G_k  (out, in)
    # W (sum G) = lhs  <=>  (sum G)^T W^T = lhs^T ; sum G is symmetric
    sol = torch.linalg.lstsq(g.sum(0), lhs.T).solution.T
    return sol.to(x.dtype)
