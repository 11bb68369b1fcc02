"""Early stopping on an evaluation metric, keeping the best parameters seen.

:func:`deltakit.train.fit` uses it when given ``early_stopping_patience``: after each
evaluation, :meth:`EarlyStopping.update` says whether ``patience`` evaluations in a row
have not improved the metric; at the end the best parameters are copied back, so the
model that ``fit`` returns (and the CLI saves) is the best one evaluated.

Example:
    >>> import torch
    >>> from deltakit.train.early_stop import EarlyStopping
    >>> w = torch.nn.Parameter(torch.zeros(1))
    >>> stop = EarlyStopping("eval_accuracy", patience=2)
    >>> [stop.update(s, {"eval_accuracy": a}, {"w": w}) for s, a in [(1, .5), (2, .7), (3, .6), (4, .7)]]
    [False, False, False, True]
    >>> stop.best, stop.best_step
    (0.7, 2)
"""
from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Literal

import torch

__all__ = ["EarlyStopping"]


class EarlyStopping:
    """Stop after ``patience`` evaluations without a strict improvement of ``metric``.

    ``mode``: ``"max"`` (accuracy, F1, MCC) or ``"min"``; default ``"min"`` for names
    ending in ``loss``, else ``"max"``. The best parameters are kept as CPU copies
    (one extra copy of the trainable parameters: small for adapters).
    """

    def __init__(self, metric: str, patience: int, mode: Literal["max", "min"] | None = None):
        if patience < 1:
            raise ValueError(f"expected early-stopping patience >= 1, found {patience}")
        mode = mode or ("min" if metric.endswith("loss") else "max")
        if mode not in ("max", "min"):
            raise ValueError(f"expected mode 'max' or 'min', found {mode!r}")
        self.metric, self.patience, self.mode = metric, patience, mode
        self.best: float | None = None
        self.best_step = 0
        self.bad = 0
        self.best_metrics: dict[str, float] = {}
        self.best_params: dict[str, torch.Tensor] = {}

    def _better(self, value: float) -> bool:
        if self.best is None:
            return True
        return value > self.best if self.mode == "max" else value < self.best

    def update(self, step: int, metrics: Mapping[str, float], params: Mapping[str, torch.Tensor]) -> bool:
        """Record one evaluation; True when training should stop now."""
        if self.metric not in metrics:
            raise ValueError(f"expected the early-stopping metric {self.metric!r} among the evaluation "
                             f"results, found {sorted(metrics)}")
        value = float(metrics[self.metric])
        if self._better(value):
            self.best, self.best_step, self.bad = value, step, 0
            self.best_metrics = dict(metrics)
            self.best_params = {n: p.detach().to("cpu", copy=True) for n, p in params.items()}
            return False
        self.bad += 1
        return self.bad >= self.patience

    def restore(self, params: Mapping[str, torch.nn.Parameter]) -> None:
        """Copy the best parameters back into ``params`` (no-op before the first evaluation)."""
        with torch.no_grad():
            for n, t in self.best_params.items():
                params[n].copy_(t)

    def state_dict(self) -> dict[str, Any]:
        """The JSON part of the state (the best parameters go to a checkpoint as tensors)."""
        return {"metric": self.metric, "patience": self.patience, "mode": self.mode, "best": self.best,
                "best_step": self.best_step, "bad": self.bad, "best_metrics": self.best_metrics}

    def load_state_dict(self, state: Mapping[str, Any], best_params: Mapping[str, torch.Tensor]) -> None:
        if state["metric"] != self.metric or state["mode"] != self.mode:
            raise ValueError(f"expected a checkpoint that stops early on {self.metric!r} ({self.mode}), found "
                             f"{state['metric']!r} ({state['mode']})")
        self.best, self.best_step, self.bad = state["best"], state["best_step"], state["bad"]
        self.best_metrics = dict(state["best_metrics"])
        self.best_params = {n: t.to("cpu") for n, t in best_params.items()}
