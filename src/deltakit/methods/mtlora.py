"""MTLoRA: task-agnostic and task-specific low-rank modules for multi-task learning (Agiza,
Neseem & Reda, "MTLoRA: A Low-Rank Adaptation Approach for Efficient Multi-Task Learning",
CVPR 2024, https://arxiv.org/abs/2403.20320).

    TA-LoRA (every target):            h = W x + s_sh B_sh A_sh x
    TS-LoRA (targets of task blocks):  h_t = W x + s_t B_t A_t x         (``shared_mode="matrix"``)
                                       h_t = W x + s_sh B_sh A_sh x + s_t B_t A_t x   (``"matrixv2"``)

Every target holds a task-agnostic LoRA shared by all tasks; the targets of the *task
blocks* also hold one LoRA per task. In the paper (a Swin encoder with one decoder per
task) the last block of each stage is a task block: it computes the shared path, which the
backbone continues with, and one path per task, which feeds that task's decoder. Here a
batch row carries its task (the routers' seam: ``batch["task_ids"]`` through
:func:`deltakit.core.tasks.task_scope` / :class:`~deltakit.core.tasks.TaskModel`); in a task
block a row of task t takes task t's path, elsewhere the shared one. With one output head
(a language model, a classifier) only the last block's task paths reach the output, so the
default task block is the last targeted block (``task_layers`` picks others; a task block
in the middle then feeds its task path on to the next block, where the paper's would go to
a per-task decoder instead: that multi-scale decoder wiring is not reproduced). Outside a
task scope every row takes the shared path.

Scales multiply directly (the official code's ``lora_shared_scale`` / ``lora_task_scale``,
not divided by r). Init and defaults as the official code (github.com/scale-lab/MTLoRA):
every A Kaiming-uniform, every B zero, r = 8, both scales 2, dropout 0.05 on the LoRA input
(one mask for both paths), ``shared_mode="matrix"``. Trainable per target:
``r (in + out)``, plus ``T r (in + out)`` in a task block.

>>> import torch, deltakit as dk
>>> from deltakit.core.tasks import task_scope
>>> m = torch.nn.Sequential(torch.nn.Sequential(torch.nn.Linear(8, 8)), torch.nn.Sequential(torch.nn.Linear(8, 8)))
>>> ad = dk.attach(m, dk.get_method("mtlora").config(n_tasks=3, r=2, targets=["0.0", "1.0"]))
>>> ad.num_parameters()   # shared 2 * 2 (8 + 8), plus 3 task LoRAs in the last block
160
>>> with task_scope([0, 2]):
...     y = m(torch.randn(2, 8))
"""
from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Literal

import torch
from torch import Tensor, nn

from ..core.delta import ActivationDelta, BuildContext, param_dtype
from ..core.fields import knob
from ..core.registry import ConfigError, DeltaConfig, register_method
from ..core.targets import layer_index
from ..core.tasks import check_task_ids, current_task_ids
from ._banks import linear_shape
from ._base_ops import Conv1D
from .lora import _cast

__all__ = ["MtLoraConfig", "MTLoRA", "TaskBlocks"]


@dataclass(frozen=True)
class MtLoraConfig(DeltaConfig):
    """MTLoRA hyper-parameters (defaults: the official code's)."""

    n_tasks: int = knob(2, ge=1, doc="T, the number of tasks (rows name them by index 0..T-1)")
    r: int = knob(8, ge=1, log=True, doc="rank of the task-agnostic and of every task-specific LoRA")
    shared_scale: float = knob(2.0, gt=0, doc="s_sh, multiplies the task-agnostic LoRA (not divided by r)")
    task_scale: float = knob(2.0, gt=0, doc="s_t, multiplies every task-specific LoRA (not divided by r)")
    dropout: float = knob(0.05, ge=0, lt=1, doc="dropout on the LoRA input (training only)")
    task_layers: tuple[int, ...] | None = knob(
        None, ge=0, doc="blocks whose targets also get task-specific LoRAs; None = the last targeted block")
    shared_mode: Literal["matrix", "matrixv2"] = knob(
        "matrix", doc="a task row in a task block: ``matrix`` (W x + task LoRA, the official default) or "
                      "``matrixv2`` (W x + shared LoRA + task LoRA)")


class TaskBlocks(nn.Module):
    """Which targeted blocks hold task-specific LoRAs (no parameters: rebuilt from the config)."""

    def __init__(self, blocks: frozenset[int]):
        super().__init__()
        self.blocks = blocks

    def extra_repr(self) -> str:
        return f"blocks={sorted(self.blocks)}"


def _kaiming(shape: tuple[int, ...], **kw) -> Tensor:
    t = torch.empty(shape, **kw)
    for m in t.view(-1, *shape[-2:]):              # each (r, in) matrix as nn.Linear would
        nn.init.kaiming_uniform_(m, a=math.sqrt(5))
    return t


@register_method("mtlora", MtLoraConfig, paper="https://arxiv.org/abs/2403.20320",
                 description="multi-task LoRA: a task-agnostic LoRA everywhere, task-specific LoRAs in task blocks")
class MTLoRA(ActivationDelta):
    supported = (nn.Linear, Conv1D)

    @classmethod
    def build_shared(cls, config: MtLoraConfig, targets: Mapping[str, nn.Module]) -> nn.Module:
        blocks = {layer_index(p) for p in targets}
        if None in blocks:
            raise ConfigError("mtlora: expected every target inside a numbered block (task blocks are blocks)")
        if config.task_layers is None:
            return TaskBlocks(frozenset({max(blocks)}))
        missing = sorted(set(config.task_layers) - blocks)
        if missing:
            raise ConfigError(f"MtLoraConfig.task_layers: expected targeted blocks {sorted(blocks)}, "
                              f"found {missing} without targets")
        return TaskBlocks(frozenset(config.task_layers))

    def __init__(self, base: nn.Module, config: MtLoraConfig, ctx: BuildContext):
        super().__init__()
        if ctx is None or ctx.shared is None:
            raise ConfigError("mtlora needs the adapter's task blocks (build it through dk.attach)")
        fan_in, fan_out = linear_shape(base, "mtlora")
        kw = dict(device=next(base.parameters()).device, dtype=param_dtype(base, config.adapter_dtype))
        r, T = config.r, config.n_tasks
        self.n_tasks, self.mode = T, config.shared_mode
        self.shared_scale, self.task_scale = config.shared_scale, config.task_scale
        self.lora_A = nn.Parameter(_kaiming((r, fan_in), **kw))                     # A_sh (r, in)
        self.lora_B = nn.Parameter(torch.zeros(fan_out, r, **kw))                   # B_sh (out, r)
        self.has_tasks = ctx.layer in ctx.shared.blocks
        if self.has_tasks:
            self.lora_task_A = nn.Parameter(_kaiming((T, r, fan_in), **kw))         # A_t (T, r, in)
            self.lora_task_B = nn.Parameter(torch.zeros(T, fan_out, r, **kw))       # B_t (T, out, r)
        self.dropout = nn.Dropout(config.dropout) if config.dropout > 0 else nn.Identity()
        self.train(base.training)  # a delta attached to a model in eval mode must not drop out

    def change(self, x: Tensor, task_ids: Tensor | None) -> Tensor:
        """What this target adds to ``W x`` (x (B, ..., in)): the shared LoRA, or in a task
        block under a task scope each row's task LoRA (plus the shared one in ``matrixv2``)."""
        xd = self.dropout(_cast(x, self.lora_A))
        shared = (xd @ self.lora_A.t()) @ self.lora_B.t() * self.shared_scale
        if not self.has_tasks or task_ids is None:
            return shared
        ids = check_task_ids(task_ids.to(x.device), self.n_tasks, x.shape[0], "mtlora")
        A, B = self.lora_task_A[ids], self.lora_task_B[ids]                          # (B, r, in), (B, out, r)
        h = torch.einsum("b...i,bri->b...r", xd, A)
        task = torch.einsum("b...r,bor->b...o", h, B) * self.task_scale
        return task + shared if self.mode == "matrixv2" else task

    def forward(self, inner, x, *args, **kwargs):
        out = inner(x, *args, **kwargs)
        return out + self.change(x, current_task_ids()).to(out.dtype)

    @classmethod
    def mixed_forward(cls, base: nn.Module, deltas: Sequence["MTLoRA"], row: Tensor, x, *args, **kwargs):
        """Rows of different adapters in one base pass (the task ids stay whole-batch)."""
        out = base(x, *args, **kwargs)
        ids = current_task_ids()
        new = out
        for k, d in enumerate(deltas):
            keep = (row == k).view(-1, *([1] * (out.dim() - 1)))
            new = torch.where(keep, out + d.change(x, ids).to(out.dtype), new)
        return new

    @classmethod
    def contract_config(cls, kind: str) -> MtLoraConfig | None:
        return None if kind == "conv" else MtLoraConfig(n_tasks=3, r=2, task_layers=(0, 1), shared_mode="matrixv2")

    def extra_repr(self) -> str:
        return f"tasks={self.n_tasks if self.has_tasks else 0}, mode={self.mode}"
