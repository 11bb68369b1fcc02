"""Scoring merged encoders, and the merges themselves (``merge_task_vectors``, AdaMerging)."""
from __future__ import annotations

import random
from collections.abc import Mapping

import torch

from _common import timer

from .config import DATA_METHODS, Config
from .data import TaskData, autocast, batches
from .finetune import compose

__all__ = ["Scorer", "normalised", "merge_once", "MultiHead", "run_adamerging"]


class Scorer:
    """One fp32 model; loads an encoder (base + dW) and each task's head, scores under autocast."""

    def __init__(self, cfg: Config, tasks: dict[str, TaskData], base_state: dict[str, torch.Tensor]):
        from deltakit.io.models import load_classifier

        self.cfg, self.tasks, self.base = cfg, tasks, base_state
        self.model, _ = load_classifier(cfg.model, 2, seed=cfg.seed)
        self.model.eval()
        self.seconds = 0.0
        self.calls = 0

    @torch.no_grad()
    def score(self, dws: Mapping[str, Mapping[str, torch.Tensor] | None], heads: Mapping[str, Mapping],
              split: str) -> dict[str, dict[str, float]]:
        """``dws[task]``: the encoder dW to use for that task (the same merged one for all tasks)."""
        from deltakit.train import evaluate

        elapsed = timer()
        out, loaded = {}, None
        for t, td in self.tasks.items():
            if dws[t] is not loaded:
                self.model.load_state_dict(compose(self.base, dws[t], {}), strict=True)
                loaded = dws[t]
            for n, w in heads[t].items():
                self.model.get_parameter(n).copy_(w)
            with autocast(self.cfg):
                r = evaluate(self.model, td.loaders[split], sorted({td.metric, "accuracy"}))
            out[t] = {"metric": td.metric, "score": round(r[td.metric], 5), "accuracy": round(r["accuracy"], 5)}
        self.seconds += elapsed()
        self.calls += 1
        return out


def normalised(scores: Mapping[str, Mapping], ref: Mapping[str, Mapping]) -> dict:
    """Mean over tasks of merged / individual (tasks whose individual score is <= 0 are left out)."""
    per = {t: (scores[t]["score"] / ref[t]["score"] if ref[t]["score"] > 1e-9 else None) for t in scores}
    vals = [v for v in per.values() if v is not None]
    return {"mean": round(sum(vals) / len(vals), 5) if vals else None,
            "per_task": {t: (round(v, 5) if v is not None else None) for t, v in per.items()}}


def merge_once(method: str, values: dict, tvs: list[dict[str, torch.Tensor]], cfg: Config,
               stats: list[dict[str, torch.Tensor]] | None = None) -> dict[str, torch.Tensor]:
    """Merged encoder dW {name: tensor} through ``merge_task_vectors``; Fisher / RegMean get
    their per-model statistics as ``stats_for`` (``stack_stats``).

    Fisher and RegMean are registered with ``inputs="weights"``; with a zero base (task vectors
    in, merged dW out) both give exactly ``theta_0 + merge(tau)`` because they are affine with
    weights summing to one: sum F_k (theta_0 + tau_k) / sum F_k = theta_0 + sum F_k tau_k / sum F_k.
    """
    from deltakit.merge import build_config, merge_task_vectors, stack_stats
    from deltakit.taskvec import TaskVector

    kind = DATA_METHODS.get(method)
    stats_for = stack_stats(kind, stats) if kind is not None and stats is not None else None
    merged = merge_task_vectors(method, [TaskVector.from_mapping(tv) for tv in tvs], build_config(method, values),
                                seed=cfg.seed, stats_for=stats_for)
    return {n: merged.dense(n, torch.float32) for n in merged.keys()}


class MultiHead(torch.nn.Module):
    """The shared encoder (parameter names as in the classifier: ``bert.*``) + one head per task."""

    def __init__(self, hf_model, heads: Mapping[str, Mapping[str, torch.Tensor]]):
        super().__init__()
        self.bert = hf_model.bert
        self.heads = torch.nn.ModuleDict()
        for t, h in heads.items():
            lin = torch.nn.Linear(*reversed(h["classifier.weight"].shape))
            lin.weight.data.copy_(h["classifier.weight"])
            lin.bias.data.copy_(h["classifier.bias"])
            lin.requires_grad_(False)
            self.heads[t] = lin

    def forward(self, batches: Mapping[str, Mapping]) -> list[torch.Tensor]:
        """{task: encoded batch} -> one logits tensor per task, each through its own head."""
        # dropout is identity in eval
        return [self.heads[t](self.bert(**enc).pooler_output).float() for t, enc in batches.items()]


def run_adamerging(cfg: Config, tasks: dict[str, TaskData], tok, base_state, tvs_list, heads,
                   init: float) -> tuple[dict, dict]:
    """AdaMerging's layer-wise coefficients from ``init`` on the unlabelled selection inputs
    -> (merged encoder dW, info)."""
    from deltakit.io.models import load_classifier
    from deltakit.merge import adamerging
    from deltakit.taskvec import TaskVector

    model, _ = load_classifier(cfg.model, 2, seed=cfg.seed)
    model.load_state_dict(base_state)
    wrapper = MultiHead(model, heads).eval()
    per_task = {t: batches(tasks[t].select, tok, cfg, cfg.adamerging_batch, len(tasks[t].select), False)
                for t in tasks}
    # one step = a batch of every task (the paper sums the tasks' entropies each step); tasks
    # with fewer batches wrap around
    rng = random.Random(cfg.seed)
    for bs in per_task.values():  # batches() groups rows by length; steps should not run short-to-long
        rng.shuffle(bs)
    n = max(len(b) for b in per_task.values())
    steps = [{t: bs[i % len(bs)] for t, bs in per_task.items()} for i in range(n)]
    tv_objs = [TaskVector.from_mapping(tv) for tv in tvs_list]
    elapsed = timer()
    with autocast(cfg):
        res = adamerging(wrapper, tv_objs, steps, steps=cfg.adamerging_steps, init=init, forward=lambda m, b: m(b))
    merged = res.task_vector(tv_objs)
    lam = res.coefficients
    info = {"seconds": elapsed(), "granularity": "layer", "steps": cfg.adamerging_steps, "lr": 1e-3, "init": init,
            "rows_per_task_per_step": cfg.adamerging_batch,
            "entropy_first": round(res.history[0], 4), "entropy_last": round(res.history[-1], 4),
            "coef_mean": round(float(lam.mean()), 4), "coef_min": round(float(lam.min()), 4),
            "coef_max": round(float(lam.max()), 4),
            "coef_mean_per_task": [round(float(v), 4) for v in lam.reshape(lam.shape[0], -1).mean(1)]}
    return {n: merged.dense(n, torch.float32) for n in merged.keys()}, info
