"""AdaMerging: learn merging coefficients by entropy minimisation on unlabeled data
(Yang et al., ICLR 2024) https://arxiv.org/abs/2310.02575

Task-wise: ``theta = theta_0 + sum_k lam_k tau_k``; layer-wise: one lam_k^l per parameter
tensor l. The lams minimise ``sum_k mean_{x in B_k} H(f(x; theta))``, the Shannon entropy
``H(p) = -sum_c p_c log p_c`` of the merged model's predictions on an unlabeled batch B_k of
every task k per step (the paper's objective; a ``forward`` that returns one tensor gives
the single-batch form). This is a short, flat loop: copy and edit it.
"""
from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import torch
from torch import nn
from torch.func import functional_call

from deltakit.taskvec import TaskVector

__all__ = ["adamerging", "AdaMergingResult", "prediction_entropy", "objective"]


def prediction_entropy(logits: torch.Tensor) -> torch.Tensor:
    """Mean entropy of softmax(logits) over all leading dims; logits (..., C)."""
    logp = torch.log_softmax(logits.float(), dim=-1)
    return -(logp.exp() * logp).sum(-1).mean()


@dataclass
class AdaMergingResult:
    names: list[str]
    coefficients: torch.Tensor           # (K,) task-wise or (K, P) layer-wise, P = len(names)
    history: list[float]                 # entropy per step

    def task_vector(self, task_vectors: Sequence[TaskVector]) -> TaskVector:
        """The merged task vector ``sum_k lam_k tau_k`` (lazy)."""
        lam = self.coefficients
        col = {n: i for i, n in enumerate(self.names)}

        def entry(n: str):
            def thunk() -> torch.Tensor:
                c = lam if lam.dim() == 1 else lam[:, col[n]]
                return sum(float(c[k]) * tv.dense(n) for k, tv in enumerate(task_vectors))
            return thunk

        return TaskVector({n: entry(n) for n in self.names})


def objective(logits: torch.Tensor | Sequence[torch.Tensor]) -> torch.Tensor:
    """AdaMerging's loss: the sum over tasks of each task batch's mean prediction entropy."""
    if isinstance(logits, torch.Tensor):
        return prediction_entropy(logits)
    if not logits:
        raise ValueError("adamerging: expected logits for at least one task, found none")
    return sum(prediction_entropy(z) for z in logits)


def _default_forward(model: nn.Module, batch: Any) -> torch.Tensor:
    out = model(**batch) if isinstance(batch, dict) else model(batch)
    return out.logits if hasattr(out, "logits") else out


def adamerging(model: nn.Module, task_vectors: Sequence[TaskVector], batches: Iterable[Any], *,
               granularity: Literal["task", "layer"] = "layer", steps: int = 500, lr: float = 1e-3,
               init: float = 0.3, clamp: tuple[float, float] | None = (0.0, 1.0),
               forward: Callable[[nn.Module, Any], torch.Tensor | Sequence[torch.Tensor]] = _default_forward,
               ) -> AdaMergingResult:
    """Optimise merging coefficients on unlabeled ``batches`` (cycled for ``steps`` Adam steps).

    One element of ``batches`` is one step. For the paper's multi-task objective make it hold
    a batch of every task and have ``forward`` return a list of logits, one per task (each
    through its own head): the step's loss is the sum of their mean entropies, so every task
    pulls on the coefficients at every step. One tensor is one task's (or a shared head's) batch.

    Defaults are the paper's (Adam, lr 1e-3, 500 steps, every lam starting at 0.3): Adam
    moves a coefficient by at most ~lr per step, so fewer steps leave the lams near ``init``.
    ``model`` holds the base weights theta_0 and is not modified. Task vectors are
    materialised densely for the parameters they share (AdaMerging needs them all at once).
    """
    params = dict(model.named_parameters())
    names = [n for n in task_vectors[0].keys() if n in params and all(n in tv for tv in task_vectors)]
    if not names:
        raise ValueError("adamerging: expected task-vector names that are model parameters, found none")
    k = len(task_vectors)
    taus = {n: torch.stack([tv.dense(n, params[n].dtype) for tv in task_vectors]).to(params[n].device)
            for n in names}  # (K, *shape)
    shape = (k,) if granularity == "task" else (k, len(names))
    lam = torch.full(shape, float(init), requires_grad=True)
    opt = torch.optim.Adam([lam], lr=lr)
    base = {n: p.detach() for n, p in params.items()}
    data = list(batches)
    if not data:
        raise ValueError("adamerging: expected at least one unlabeled batch, found none")
    history: list[float] = []
    model.eval()
    for step in range(steps):
        merged = dict(base)
        for j, n in enumerate(names):
            c = lam if granularity == "task" else lam[:, j]
            merged[n] = base[n] + torch.tensordot(c.to(taus[n].dtype), taus[n], dims=1)
        loss = objective(forward_with(model, merged, data[step % len(data)], forward))
        opt.zero_grad()
        loss.backward()
        opt.step()
        if clamp is not None:
            with torch.no_grad():
                lam.clamp_(*clamp)
        history.append(float(loss.detach()))
    return AdaMergingResult(names, lam.detach().clone(), history)


def forward_with(model: nn.Module, params: dict[str, torch.Tensor], batch: Any,
                 forward: Callable[[nn.Module, Any], torch.Tensor]) -> torch.Tensor:
    """Run ``forward(model, batch)`` with ``params`` substituted (no copy of the model)."""
    class _Proxy(nn.Module):
        def __call__(self, *args, **kwargs):
            return functional_call(model, params, args, kwargs)
    return forward(_Proxy(), batch)
