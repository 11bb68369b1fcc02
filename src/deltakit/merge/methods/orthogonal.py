"""Orthogonal projection-based continual merging, OPCM ("Merging Models on the Fly Without
Retraining", Tang et al., 2025) https://arxiv.org/abs/2501.09522

Models arrive one at a time. For a matrix parameter, with the running merge M = U S V^T,
the new task vector is projected off M's leading subspace (the singular directions that
carry an ``alpha`` fraction of sum S, plus the diagonal of U^T tau V):
``tau' = U P V^T``, ``P = U^T tau V`` with ``P[:r, :r] = 0`` and ``diag(P) = 0``.
The unscaled sum ``S_t = S_{t-1} + tau'_t`` is rescaled so its norm equals the mean task
vector norm: ``M_t = S_t * mean_k |tau_k| / |S_t|`` (per tensor here; the paper uses the
whole model's norm). Vectors (biases, norms) are summed and rescaled the same way.
"""
from dataclasses import dataclass

import torch

from ...core.fields import Checked, knob
from .._registry import MergeContext, register_merge


@dataclass(frozen=True)
class OrthogonalConfig(Checked):
    alpha: float = knob(0.5, ge=0, le=1, doc="fraction of the singular-value mass each task's top directions carry")


@register_merge("opcm", paper="https://arxiv.org/abs/2501.09522", config=OrthogonalConfig)
def opcm(x: torch.Tensor, base: torch.Tensor, cfg: OrthogonalConfig, ctx: MergeContext) -> torch.Tensor:
    k = x.shape[0]
    running = x[0].clone()  # S_1 = tau_1
    merged = x[0]
    norms = [float(torch.linalg.vector_norm(x[0]))]
    for t in range(1, k):
        tau = x[t]
        norms.append(float(torch.linalg.vector_norm(tau)))
        if tau.dim() == 2 and torch.linalg.vector_norm(merged) > 0:
            # U P V^T with P = U^T tau V, P[:r, :r] = 0 and diag(P) = 0 equals
            # tau - U_r (U_r^T tau V_r) V_r^T - sum_{i>=r} (u_i^T tau v_i) u_i v_i^T, which needs
            # only a thin SVD (a full one is 7.5 GB of U for a 30522 x 384 embedding).
            u, s, vh = torch.linalg.svd(merged.to(torch.float64), full_matrices=False)
            r = int((s.cumsum(0) / s.sum() > cfg.alpha).float().argmax())
            t64 = tau.to(torch.float64)
            ur, vr = u[:, :r], vh[:r].T
            proj = t64 - ur @ (ur.T @ t64 @ vr) @ vr.T
            proj -= (u[:, r:] * (u[:, r:] * (t64 @ vh[r:].T)).sum(0)) @ vh[r:]
            tau = proj.to(x.dtype)
        running = running + tau
        n = torch.linalg.vector_norm(running)
        avg = sum(norms) / len(norms)
        merged = running * (avg / n) if n > 0 else running
    return base + merged
