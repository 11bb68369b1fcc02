"""LCSC's coefficient search (Liu et al., 2024, https://arxiv.org/abs/2404.02241).

``theta = sum_i alpha_i theta_i`` with ``sum_i alpha_i = 1`` over K checkpoints of one run is
searched as ``theta = theta_K + sum_{i<K} alpha_i (theta_i - theta_K)`` (alpha_K = 1 - the
rest): K - 1 free coefficients, one "task vector" per earlier checkpoint against the last one,
so the search is :func:`deltakit.merge.evolve_coefficients` (Optuna's CMA-ES sampler;
resumable and shareable through an Optuna study's storage) with no optimiser of its own.

The paper searches with its own evolutionary algorithm; CMA-ES is an evolution strategy over
the same K - 1 dimensional space (deltakit's one evolutionary optimiser). The first point
evaluated is the uniform average of the checkpoints (every alpha = 1/K).
"""
from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field

import torch

from deltakit.taskvec import TaskVector

from ._evolve import evolve_coefficients

__all__ = ["lcsc_search", "LcscResult"]


@dataclass
class LcscResult:
    coefficients: list[float]            # alpha_1..alpha_K (sum 1), the best point found
    best_value: float
    history: list[float] = field(default_factory=list)  # objective per trial, in order

    def state_dict(self, checkpoints: Sequence[Mapping[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
        """``sum_i alpha_i theta_i`` for the float tensors (others taken from the last checkpoint)."""
        return _combine(checkpoints, self.coefficients)

    def recipe_parameters(self) -> dict[str, list[float]]:
        """``parameters`` for a ``method: lcsc`` recipe over the same checkpoints, in the same order."""
        return {"weights": list(self.coefficients)}


def _combine(checkpoints: Sequence[Mapping[str, torch.Tensor]], alpha: Sequence[float]) -> dict[str, torch.Tensor]:
    last = checkpoints[-1]
    out = dict(last)
    for n, t in last.items():
        if t.is_floating_point():
            acc = sum(a * ck[n].double() for a, ck in zip(alpha, checkpoints))
            out[n] = acc.to(t.dtype)
    return out


def lcsc_search(checkpoints: Sequence[Mapping[str, torch.Tensor]],
                objective: Callable[[dict[str, torch.Tensor]], float], *, n_trials: int = 100,
                bounds: tuple[float, float] = (-1.0, 1.0), seed: int = 0, study=None) -> LcscResult:
    """Maximise ``objective(state_dict)`` (e.g. minus FID, minus validation loss) over LCSC's
    alphas for ``checkpoints`` (oldest first; the last is the run's final one).

    ``bounds`` box each free alpha_i (i < K); negative values are allowed, as in the paper.
    ``study``: an Optuna study (e.g. with RDB storage, to resume or share workers).
    """
    k = len(checkpoints)
    if k < 2:
        raise ValueError(f"lcsc_search: expected at least 2 checkpoints, found {k}")
    last = checkpoints[-1]
    names = [n for n, t in last.items() if t.is_floating_point()]
    for i, ck in enumerate(checkpoints[:-1]):
        missing = [n for n in names if n not in ck or tuple(ck[n].shape) != tuple(last[n].shape)]
        if missing:
            raise ValueError(f"lcsc_search: checkpoint {i}: expected {missing[0]!r} shaped "
                             f"{tuple(last[missing[0]].shape)} as in the last checkpoint, found "
                             f"{tuple(ck[missing[0]].shape) if missing[0] in ck else 'none'}")
    taus = [TaskVector.from_state_dicts({n: ck[n] for n in names}, {n: last[n] for n in names})
            for ck in checkpoints[:-1]]
    res = evolve_coefficients(last, taus, objective, granularity="task", n_trials=n_trials, init=1.0 / k,
                              bounds=bounds, seed=seed, backend="optuna", study=study)
    free = res.coefficients["all"]
    return LcscResult([*free, 1.0 - sum(free)], res.best_value, res.history)
