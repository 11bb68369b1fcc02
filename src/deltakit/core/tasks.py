"""Task ids per call, for multi-task methods (MTLoRA, HyperFormer) whose deltas compute a
different change for rows of different tasks.

The seam is the one the routers use (:mod:`deltakit.route.poly`): a batch carries
``task_ids`` (B,), one task index per row, and a wrapper applies it around the model's
forward. Here the ids go into a :class:`contextvars.ContextVar` (per thread, like the
routing of :mod:`deltakit.core.state`), which a delta reads with :func:`current_task_ids`;
:class:`TaskModel` lets :func:`deltakit.train.fit` feed ``batch["task_ids"]`` to it, as
``PolyModel`` does for Poly's routing.

>>> import torch
>>> with task_scope(torch.tensor([0, 2])):
...     current_task_ids().tolist()
[0, 2]
>>> current_task_ids() is None
True
"""
from __future__ import annotations

import contextlib
import contextvars
from collections.abc import Iterator, Sequence

import torch
from torch import Tensor, nn

from . import state as _state

__all__ = ["task_scope", "current_task_ids", "TaskModel", "check_task_ids"]

_TASKS: contextvars.ContextVar[Tensor | None] = contextvars.ContextVar("deltakit_task_ids", default=None)


@contextlib.contextmanager
def task_scope(task_ids: Tensor | Sequence[int]) -> Iterator[Tensor]:
    """Within the block (this thread / context only), forwards see ``task_ids`` (B,)."""
    ids = torch.as_tensor(task_ids).reshape(-1).long()
    # counted as an open call scope: forwards skip the context lookups while none is open
    with _state.scopes_open():
        token = _TASKS.set(ids)
        try:
            yield ids
        finally:
            _TASKS.reset(token)


def current_task_ids() -> Tensor | None:
    """The task ids of the innermost :func:`task_scope`, or None outside any."""
    if not _state._OPEN_SCOPES:  # a plain int read: torch.compile traces it
        return None
    return _TASKS.get()


def check_task_ids(ids: Tensor, n_tasks: int, rows: int, who: str) -> Tensor:
    """``ids`` (B,) checked against ``n_tasks`` and the batch's ``rows``."""
    if ids.shape[0] != rows:
        raise ValueError(f"{who}: the task scope names {ids.shape[0]} rows, the input has {rows}")
    bad = ids[(ids < 0) | (ids >= n_tasks)]
    if bad.numel():
        raise ValueError(f"{who}: expected task ids in [0, {n_tasks}), found {bad.tolist()[:5]}")
    return ids


class TaskModel(nn.Module):
    """``model`` whose forward takes ``task_ids`` (as a batch from a multi-task loader carries
    them) and runs ``model(*args, **kwargs)`` inside :func:`task_scope`, so :func:`fit` trains
    multi-task adapters unchanged."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, *args, task_ids: Tensor | Sequence[int], **kwargs):
        with task_scope(task_ids):
            return self.model(*args, **kwargs)
