"""LISA: Layerwise Importance Sampled AdamW (Pan et al., 2024) https://arxiv.org/abs/2403.17919

    every K steps: active = {embedding, head, other non-block modules} ∪ sample(blocks, gamma)
    trained: W' = P (full copy, initialised to W) for active targets; the rest frozen

The adapter is a full-copy delta on every parameterised module (like ``full``);
:class:`LisaSchedule` is the training-time part: a callback whose
``on_step(step, model)`` re-draws ``gamma`` of the transformer blocks uniformly every
``period`` steps and toggles ``requires_grad`` (inactive parameters also lose their
``.grad``, so torch optimisers skip them). Modules outside the blocks (embeddings,
head, final norm: path without a block index) are always trained.

Counts: stored = every target's parameters (a full fine-tune's worth);
``adapter.num_parameters(trainable_only=True)`` = what is active at this step =
non-block modules + gamma blocks. Build the optimiser over ALL
``adapter.parameters()`` (not only those trainable at step 0), so re-activated blocks
are in it.

Tied weights (GPT-2's ``lm_head`` IS ``wte``): a delta on one user of a tied tensor
would not reach the other user unmerged, yet would reach both once merged. So the
GPT-2 default leaves the tied embedding/head out (a deviation from the paper, which
always trains them; untie them to train them), and a target list that contains both
users of a tied tensor is refused.

>>> import torch, deltakit as dk
>>> from deltakit.methods.lisa import LisaConfig, LisaSchedule
>>> m = torch.nn.ModuleDict({"emb": torch.nn.Embedding(5, 2),
...                          "layers": torch.nn.ModuleList([torch.nn.Linear(2, 2) for _ in range(4)])})
>>> ad = dk.attach(m, LisaConfig(gamma=1, period=10, targets=["emb", "re:layers\\\\.\\\\d+"]))
>>> sched = LisaSchedule(ad)
>>> ad.num_parameters(), ad.num_parameters(trainable_only=True)     # 10 + 4 * 6 stored; 10 + 6 active
(34, 16)
"""
from __future__ import annotations

import random
from collections.abc import Mapping
from dataclasses import dataclass

from torch import Tensor, nn

from ..core.adapter import Adapter
from ..core.delta import BuildContext, WeightDelta
from ..core.fields import knob
from ..core.registry import ConfigError, DeltaConfig, register_method
from ..core.targets import TargetError

__all__ = ["LisaConfig", "Lisa", "LisaSchedule"]


@dataclass(frozen=True)
class LisaConfig(DeltaConfig):
    """LISA hyper-parameters (used by :class:`LisaSchedule`)."""

    gamma: int = knob(2, ge=1, doc="number of blocks trained at a time")
    period: int = knob(20, ge=1, doc="re-sample the active blocks every ``period`` optimiser steps (the paper's K)")
    seed: int = knob(0, doc="seed of the sampling")


def _has_params(module: nn.Module) -> bool:
    return next(module.parameters(recurse=False), None) is not None


@register_method("lisa", LisaConfig, paper="https://arxiv.org/abs/2403.17919",
                 description="full-copy deltas; a callback trains embeddings/head + gamma sampled blocks")
class Lisa(WeightDelta):
    @classmethod
    def training_hooks(cls, adapter, *, loader=None, total_steps: int | None = None):
        """The optimiser holds every block (the schedule toggles which ones get gradients)."""
        return dict(adapter.named_parameters()), [LisaSchedule(adapter)]

    supported = (nn.Module,)  # any module with direct parameters, see ``supports``
    weight_dependent = True
    default_targets = {"bert": ("re:.*",), "roberta": ("re:.*",), "llama": ("re:.*",),
                       "mistral": ("re:.*",), "qwen2": ("re:.*",),
                       # wte is tied to lm_head: see the module docstring
                       "gpt2": (r"re:transformer\.h\..*", "wpe", "ln_f")}

    @classmethod
    def supports(cls, base: nn.Module) -> bool:
        return _has_params(base)

    @classmethod
    def contract_config(cls, kind: str) -> LisaConfig | None:
        # Position embeddings see position ids of shape (1, T), shared by all rows, which
        # the core's mixed-batch path rejects (reported to the lead); leave them out here.
        if kind == "gpt2":
            return LisaConfig(gamma=1, targets=(r"re:transformer\.h\..*", "ln_f"),
                              target_types=("Conv1D", "LayerNorm"))
        exclude = ("position_embeddings",) if kind == "bert" else ()
        return None if kind == "conv" else LisaConfig(gamma=1, exclude=exclude)

    @classmethod
    def build_shared(cls, config: LisaConfig, targets: Mapping[str, nn.Module]) -> None:
        # two full copies of one tied tensor would each add their dW to it on merge
        owner: dict[int, str] = {}
        for path, m in targets.items():
            for p in m.parameters(recurse=False):
                if id(p) in owner:
                    raise TargetError(f"lisa: targets {owner[id(p)]!r} and {path!r} share (tied) parameters; "
                                      f"expected each tensor once, exclude one of them")
                owner[id(p)] = path
        return None

    def __init__(self, base: nn.Module, config: LisaConfig, ctx: BuildContext):
        super().__init__()
        self.layer = ctx.layer
        self.values = nn.ParameterDict({k: nn.Parameter(p.detach().clone())
                                        for k, p in base.named_parameters(recurse=False)})

    def delta(self, base: Mapping[str, Tensor]) -> dict[str, Tensor]:
        return {k: v.float() - base[k].float() for k, v in self.values.items()}

    def extra_repr(self) -> str:
        return f"layer={self.layer}"


class LisaSchedule:
    """Training callback: ``on_step(step, model)`` after each optimiser step (1-based).

    Samples the first active set at construction; re-samples when ``step % period == 0``.
    """

    def __init__(self, adapter: Adapter):
        if adapter.spec.name != "lisa":
            raise ConfigError(f"LisaSchedule: expected a 'lisa' adapter, found method {adapter.spec.name!r}")
        self.adapter = adapter
        cfg: LisaConfig = adapter.config
        self.gamma, self.period = cfg.gamma, cfg.period
        self.blocks = sorted({d.layer for _, d in adapter.deltas() if d.layer is not None})
        if self.gamma > len(self.blocks):
            raise ConfigError(f"lisa: gamma={self.gamma} expected <= the number of blocks, found {len(self.blocks)}")
        self.rng = random.Random(cfg.seed)
        self.active: tuple[int, ...] = ()
        self.resample()

    def resample(self) -> tuple[int, ...]:
        self._activate(tuple(sorted(self.rng.sample(self.blocks, self.gamma))))
        return self.active

    def _activate(self, active: tuple[int, ...]) -> None:
        """Train the blocks ``active`` (and every non-block module); freeze the other blocks."""
        self.active = active
        for _, d in self.adapter.deltas():
            on = d.layer is None or d.layer in self.active
            for p in d.parameters():
                p.requires_grad_(on)
                if not on:
                    p.grad = None

    def state_dict(self) -> dict[str, object]:
        """The sampler's state and the active blocks (the checkpoint protocol of
        :func:`deltakit.train.fit`): a resumed run draws the blocks this one would have."""
        version, internal, gauss = self.rng.getstate()
        return {"rng": [version, list(internal), gauss], "active": list(self.active)}

    def load_state_dict(self, state: dict[str, object]) -> None:
        """Restore :meth:`state_dict`, and the ``requires_grad`` flags of the active set with it."""
        active = tuple(state["active"])
        if len(active) != self.gamma or not set(active) <= set(self.blocks):
            raise ValueError(f"LisaSchedule: expected {self.gamma} active blocks among {self.blocks}, "
                             f"found {list(active)}")
        version, internal, gauss = state["rng"]
        self.rng.setstate((version, tuple(internal), gauss))
        self._activate(active)

    def on_step(self, step: int, model: nn.Module | None = None) -> None:
        if step % self.period == 0:
            self.resample()
