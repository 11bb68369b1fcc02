"""Evolutionary search of merging coefficients with CMA-ES (as in Akiba et al., 2025,
"Evolutionary optimization of model merging recipes", https://arxiv.org/abs/2403.13187).

Searches ``theta = theta_0 + sum_k lam_{k,g} tau_k`` with one coefficient per model and
layer group g (or per model only), maximising a user ``objective(state_dict) -> float``.
Uses Optuna's CmaEsSampler (resumable through Optuna storage) or the ``cmaes`` package.
"""
from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Literal

import torch

from deltakit.taskvec import TaskVector

from ._layers import layer_index

__all__ = ["evolve_coefficients", "EvolveResult", "layer_groups"]


def layer_groups(names: Sequence[str]) -> dict[str, list[str]]:
    """Group parameter names by transformer block (``layer.3``); the rest go to ``other``."""
    groups: dict[str, list[str]] = {}
    for n in names:
        i = layer_index(n)
        groups.setdefault("other" if i is None else f"layer.{i}", []).append(n)
    return groups


@dataclass
class EvolveResult:
    coefficients: dict[str, list[float]]  # group -> one lam per model
    best_value: float
    history: list[float] = field(default_factory=list)

    def state_dict(self, base: Mapping[str, torch.Tensor], task_vectors: Sequence[TaskVector],
                   groups: Mapping[str, list[str]]) -> dict[str, torch.Tensor]:
        return _merge(base, task_vectors, groups, self.coefficients)


def _merge(base, tvs, groups, coeffs) -> dict[str, torch.Tensor]:
    out = dict(base)
    for g, names in groups.items():
        for n in names:
            d = sum(c * tv.dense(n, torch.float32) for c, tv in zip(coeffs[g], tvs))
            out[n] = (base[n].float() + d).to(base[n].dtype)
    return out


def evolve_coefficients(base: Mapping[str, torch.Tensor], task_vectors: Sequence[TaskVector],
                        objective: Callable[[dict[str, torch.Tensor]], float], *,
                        granularity: Literal["layer", "task"] = "layer", n_trials: int = 50,
                        init: float = 0.5, sigma0: float = 0.2, bounds: tuple[float, float] = (0.0, 1.5),
                        seed: int = 0, backend: Literal["optuna", "cmaes"] = "optuna",
                        study=None) -> EvolveResult:
    """Maximise ``objective(merged_state_dict)`` over merging coefficients with CMA-ES.

    ``study``: an existing Optuna study (e.g. with RDB storage to resume or share workers).
    ``sigma0`` is used by the ``cmaes`` backend only (Optuna >= 4.9 picks its own step size).
    """
    names = [n for n in task_vectors[0].keys() if n in base and all(n in tv for tv in task_vectors)]
    groups = layer_groups(names) if granularity == "layer" else {"all": names}
    k = len(task_vectors)
    keys = [(g, i) for g in groups for i in range(k)]

    def evaluate(vec: Sequence[float]) -> float:
        coeffs = {g: [float(vec[j]) for j, (gg, _) in enumerate(keys) if gg == g] for g in groups}
        return float(objective(_merge(base, task_vectors, groups, coeffs)))

    search = _optuna_search if backend == "optuna" else _cmaes_search
    best, best_v, history = search(evaluate, [f"{g}/{i}" for g, i in keys], n_trials=n_trials, init=init,
                                   sigma0=sigma0, bounds=bounds, seed=seed, study=study)
    coeffs = {g: [float(best[j]) for j, (gg, _) in enumerate(keys) if gg == g] for g in groups}
    return EvolveResult(coeffs, best_v, history)


def _optuna_search(evaluate, params: list[str], *, n_trials, init, sigma0, bounds, seed, study):
    """Optuna's CMA-ES sampler over ``params`` ("group/model" names, which a resumed study
    shares) -> (best point, best value, every value in trial order)."""
    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    # x0 / sigma0 are deprecated in Optuna >= 4.9: CMA starts at the centre of the box with
    # sigma = width / 6; the init point is evaluated first through an enqueued trial.
    sampler = optuna.samplers.CmaEsSampler(seed=seed)
    study = study or optuna.create_study(direction="maximize", sampler=sampler)
    study.enqueue_trial({p: init for p in params})
    history: list[float] = []

    def trial_fn(trial) -> float:
        v = evaluate([trial.suggest_float(p, *bounds) for p in params])
        history.append(v)
        return v

    study.optimize(trial_fn, n_trials=n_trials)
    return [study.best_params[p] for p in params], float(study.best_value), history


def _cmaes_search(evaluate, params: list[str], *, n_trials, init, sigma0, bounds, seed, study):
    """The ``cmaes`` package's ask / tell loop (it minimises, so values are negated)."""
    import numpy as np

    pairs = cma_ask_tell(lambda x: -evaluate(x), np.full(len(params), init, dtype=float), budget=n_trials,
                         sigma0=sigma0, bounds=bounds, seed=seed)
    history = [-v for _, v in pairs]
    best = max(range(len(history)), key=history.__getitem__)  # the first of equal values, as before
    return pairs[best][0], history[best], history


def cma_ask_tell(objective, mean, *, budget: int, sigma0: float, bounds: tuple[float, float], seed: int,
                 on_value=None) -> list:
    """``(x, objective(x))`` for ``budget`` points asked of the ``cmaes`` package's CMA-ES (which
    minimises), in evaluation order; each full generation is told back, a last partial one is not.
    ``on_value(v)`` after every evaluation (progress). Shared by evolved merges and LoraHub."""
    import numpy as np
    from cmaes import CMA

    dims = len(mean)
    opt = CMA(mean=np.asarray(mean, dtype=float), sigma=sigma0, bounds=np.array([bounds] * dims, dtype=float),
              seed=seed)
    pairs: list = []
    while len(pairs) < budget:
        sols = []
        for _ in range(min(opt.population_size, budget - len(pairs))):
            x = opt.ask()
            v = objective(x)
            sols.append((x, v))
            if on_value is not None:
                on_value(v)
        pairs += sols
        if len(sols) == opt.population_size:
            opt.tell(sols)
    return pairs
