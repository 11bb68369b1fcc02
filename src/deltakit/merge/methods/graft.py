"""Model grafting (Panigrahi et al., ICML 2023, "Task-Specific Skill Localization in Fine-tuned
Language Models") https://arxiv.org/abs/2302.06600

``theta = theta_pre + sum_k gamma_k * tau_k`` elementwise, with gamma_k the binary graft of
task k (``ctx.stats["graft_mask"]`` (K, *shape), learned on task data by
:func:`deltakit.merge.localize_skill` and saved with ``GraftResult.save``). K = 1 is the
paper's graft; K > 1 grafts several tasks' skills at once, which the paper finds land in
nearly disjoint regions (where two grafts overlap their deltas add). A tensor without a mask
was not localized and keeps theta_pre; a run with no mask at all is an error.
"""
from dataclasses import dataclass

import torch

from ...core.fields import Checked, knob
from .._registry import MergeContext, register_merge


@dataclass(frozen=True)
class GraftConfig(Checked):
    threshold: float = knob(0.5, ge=0, lt=1, doc="a mask entry above this is in the graft (masks are 0 / 1; "
                                                 "0.5 also rounds a relaxed mask)")


@register_merge("graft", paper="https://arxiv.org/abs/2302.06600", config=GraftConfig, uses_stats=("graft_mask",))
def graft(x: torch.Tensor, base: torch.Tensor, cfg: GraftConfig, ctx: MergeContext) -> torch.Tensor:
    """Shapes: x (K, *shape) task vectors, ``graft_mask`` (K, *shape), base (*shape) -> (*shape)."""
    mask = ctx.stats.get("graft_mask")
    if mask is None:
        return base.clone()
    if tuple(mask.shape) != tuple(x.shape):
        raise ValueError(f"graft: expected graft_mask shape {tuple(x.shape)}, found {tuple(mask.shape)}")
    return base + torch.where(mask > cfg.threshold, x, torch.zeros((), dtype=x.dtype)).sum(0)
