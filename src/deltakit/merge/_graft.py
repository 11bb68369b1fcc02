"""Task-specific skill localization by model grafting (Panigrahi et al., ICML 2023, "Task-Specific
Skill Localization in Fine-tuned Language Models") https://arxiv.org/abs/2302.06600

A graft is a binary mask gamma over the parameters; the grafted model is
``theta(gamma) = theta_pre + gamma * (theta_ft - theta_pre)`` (elementwise). gamma is learned
on task data through a relaxation ``gamma = gamma_base + (1 - 2 gamma_base) * sigmoid(S - b)``:

- ``gamma_base``: the ``sparsity`` fraction of entries of the task vector with the largest
  magnitude over all localized tensors (the authors' "highest_movement" start);
- ``S`` (one real per parameter entry) starts uniform in [0, 1) and ``b`` (``sigmoid_bias``,
  10) keeps ``sigmoid(S - b)`` ~ 5e-5 at the start, so gamma starts at gamma_base; a step of
  S can flip an entry in (where gamma_base = 0) or out (where gamma_base = 1);
- each step is one plain SGD step on S with the gradient of the mean loss over the given
  batches (the authors accumulate over the whole few-shot train set per "epoch");
- the graft is ``round(gamma)`` (entries with gamma > 1/2), scored after every step when a
  ``score`` is given (the authors keep the best train + validation score), else the last one.

Defaults follow the authors' released scripts: lr 1e7 (the loss gradients w.r.t. S are tiny:
they carry ``sigmoid'(-10)`` ~ 5e-5), 10 steps, ``sigmoid_bias`` 10. Their sparsity was
1e-7..1e-5 of RoBERTa-base's 125M parameters (tens to ~1000 entries); deltakit's default
1e-4 suits the smaller models it targets. One deliberate difference: gamma_base holds exactly
``floor(sparsity * n)`` entries (ties by position); the authors' strict ``>`` on the k-th
largest magnitude keeps one fewer.

The data path is the one :func:`deltakit.merge.estimate_fisher` uses: an iterable of batches
and ``loss_fn(model, batch) -> scalar`` (default: ``model(**batch).loss``). The model holds
theta_pre and is never modified. The graft applies through the registered ``graft`` merge
method (``stats: {graft_mask: [mask.safetensors]}`` in a recipe) or :meth:`GraftResult.task_vector`.
"""
from __future__ import annotations

import os
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn
from torch.func import functional_call

from deltakit.core.seeding import generator
from deltakit.io.tensors import save_tensors
from deltakit.taskvec import TaskVector

from ._adamerging import forward_with
from ..core.stats import _default_loss

__all__ = ["localize_skill", "GraftResult", "base_patch"]


@dataclass
class GraftResult:
    masks: dict[str, torch.Tensor]       # name -> bool mask shaped like the parameter
    history: list[float] = field(default_factory=list)   # mean loss of the relaxed graft per step
    scores: list[float] = field(default_factory=list)    # score of the rounded graft per step
    best_step: int | None = None         # the step whose graft was kept (None: the last)

    @property
    def size(self) -> int:
        """Entries in the graft (the paper's |gamma|)."""
        return int(sum(int(m.sum()) for m in self.masks.values()))

    @property
    def numel(self) -> int:
        return int(sum(m.numel() for m in self.masks.values()))

    def task_vector(self, task_vector: TaskVector) -> TaskVector:
        """``gamma * tau`` (lazy, dense values) over the localized names."""
        def entry(n: str) -> Callable[[], torch.Tensor]:
            return lambda: task_vector.dense(n) * self.masks[n].to(task_vector.dense(n).dtype)
        return TaskVector({n: entry(n) for n in self.masks})

    def save(self, path: str | os.PathLike) -> None:
        """The masks as one safetensors file (fp32 0 / 1): the ``graft_mask`` statistic of a recipe."""
        save_tensors(path, {n: m.to(torch.float32) for n, m in self.masks.items()},
                     metadata={"deltakit_stat": "graft_mask", "graft_size": str(self.size)})


def base_patch(taus: dict[str, torch.Tensor], sparsity: float) -> dict[str, torch.Tensor]:
    """gamma_base: exactly ``max(1, floor(sparsity * n))`` largest |tau| entries over all tensors
    (n = their total size), ties taken lowest position first (names in the given order)."""
    flat = torch.cat([t.detach().reshape(-1).abs().float() for t in taus.values()])
    k = max(1, int(sparsity * flat.numel()))
    keep = torch.zeros(flat.numel(), dtype=torch.bool)
    # a stable descending sort: equal magnitudes keep their order
    keep[torch.sort(flat, descending=True, stable=True).indices[:k]] = True
    out, at = {}, 0
    for n, t in taus.items():
        out[n] = keep[at:at + t.numel()].reshape(t.shape)
        at += t.numel()
    return out


def _relaxed(basep: torch.Tensor, s: torch.Tensor, bias: float) -> torch.Tensor:
    """gamma = gamma_base + (1 - 2 gamma_base) * sigmoid(S - b)."""
    b = basep.to(s.dtype)
    return b + (1 - 2 * b) * torch.sigmoid(s - bias)


def _taus(model: nn.Module, task_vector: TaskVector, names: Sequence[str] | None) -> dict[str, torch.Tensor]:
    params = dict(model.named_parameters())
    chosen = [n for n in task_vector.keys() if n in params and (names is None or n in names)]
    if not chosen:
        raise ValueError("localize_skill: expected task-vector names that are model parameters, found none")
    for n in chosen:
        if tuple(task_vector.shape(n)) != tuple(params[n].shape):
            raise ValueError(f"localize_skill: {n}: expected shape {tuple(params[n].shape)}, "
                             f"found {tuple(task_vector.shape(n))}")
    return {n: task_vector.dense(n, params[n].dtype).to(params[n].device) for n in chosen}


def localize_skill(model: nn.Module, task_vector: TaskVector, batches: Iterable[Any], *,
                   sparsity: float = 1e-4, steps: int = 10, lr: float = 1e7, sigmoid_bias: float = 10.0,
                   loss_fn: Callable[[nn.Module, Any], torch.Tensor] = _default_loss,
                   score: Callable[[nn.Module], float] | None = None, names: Sequence[str] | None = None,
                   seed: int = 0) -> GraftResult:
    """Learn a sparse graft of ``task_vector`` onto ``model`` (theta_pre) that keeps the task's loss low.

    ``score(grafted_model) -> float`` (higher is better, e.g. train + validation accuracy)
    picks the best rounded graft over the steps, as the authors do; ``names`` restricts the
    localized parameters (the authors leave embeddings and the head out). ``steps=0`` returns
    gamma_base. The model is not modified.
    """
    if not 0 < sparsity <= 1:
        raise ValueError(f"localize_skill: sparsity: expected a fraction in (0, 1], found {sparsity}")
    taus = _taus(model, task_vector, names)
    basep = base_patch(taus, sparsity)
    theta0 = {n: p.detach() for n, p in model.named_parameters()}
    s = {n: torch.rand(t.shape, generator=generator(seed, "graft", n), dtype=torch.float32).to(t.device)
         .requires_grad_(True) for n, t in taus.items()}
    opt = torch.optim.SGD(list(s.values()), lr=lr)
    data = list(batches)
    if steps > 0 and not data:
        raise ValueError("localize_skill: expected at least one batch, found none")
    result = GraftResult(dict(basep))
    best = None
    model.eval()
    for step in range(steps):
        opt.zero_grad(set_to_none=True)
        total = 0.0
        for batch in data:  # the mean loss over every batch: one gradient per step
            params = {**theta0, **{n: theta0[n] + _relaxed(basep[n], s[n], sigmoid_bias).to(t.dtype) * t
                                   for n, t in taus.items()}}
            loss = forward_with(model, params, batch, loss_fn) / len(data)
            loss.backward()
            total += float(loss.detach())
        opt.step()
        result.history.append(total)
        masks = _rounded(basep, s, sigmoid_bias)
        if score is None:
            result.masks = masks
            continue
        value = float(score(_grafted(model, theta0, taus, masks)))
        result.scores.append(value)
        if best is None or value > best:
            best, result.masks, result.best_step = value, masks, step
    return result


def _rounded(basep: dict[str, torch.Tensor], s: dict[str, torch.Tensor], bias: float) -> dict[str, torch.Tensor]:
    with torch.no_grad():
        return {n: _relaxed(basep[n], s[n], bias) > 0.5 for n in s}


def _grafted(model: nn.Module, theta0: dict[str, torch.Tensor], taus: dict[str, torch.Tensor],
             masks: dict[str, torch.Tensor]) -> nn.Module:
    """A module running ``model`` with theta_pre + mask * tau (no copy of the model)."""
    params = {**theta0, **{n: theta0[n] + masks[n].to(t.dtype) * t for n, t in taus.items()}}

    class _Grafted(nn.Module):
        def __call__(self, *args, **kwargs):
            with torch.no_grad():
                return functional_call(model, params, args, kwargs)
    return _Grafted()
