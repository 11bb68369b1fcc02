"""The systems compared: each scores one task's dev rows with a pool of library adapters
(all of them, or all but the task's own for leave-one-task-out)."""
from __future__ import annotations

import contextlib
from collections.abc import Callable

from .config import Config
from .setup import World, merged_into_base

__all__ = ["SYSTEM_FNS", "score", "pool_for"]


LAST_OUTPUTS: list[str] = []   # the latest scoring's first answers, for the report


def score(w: World, cfg: Config, task: str, **kw) -> float:
    from deltakit.train.gen_eval import evaluate_generation
    r = evaluate_generation(w.model, w.tok, w.dev[task], task=task, max_new_tokens=cfg.max_new_tokens,
                            batch_size=cfg.batch_size, **kw)
    LAST_OUTPUTS[:] = r["outputs"][:4]
    return round(r["accuracy"], 4)


def pool_for(w: World, task: str, loo: bool) -> tuple[str, ...]:
    return tuple(n for n in w.names if not (loo and n == task))


def base(w: World, cfg: Config, task: str, pool) -> dict:
    import deltakit as dk
    with dk.disabled(w.model):
        return {"accuracy": score(w, cfg, task)}


def oracle(w: World, cfg: Config, task: str, pool) -> dict:
    return {"accuracy": score(w, cfg, task, adapters=task)}


def _merged(method: str) -> Callable:
    def run(w: World, cfg: Config, task: str, pool) -> dict:
        from deltakit.merge import build_config, merge_task_vectors
        from deltakit.taskvec import TaskVector
        from deltakit.core.adapter import get_adapter

        tvs = [TaskVector.from_adapter(get_adapter(w.model, n)) for n in pool]
        merged = merge_task_vectors(method, tvs, build_config(method, {}))  # linear: the mean (normalised weights)
        with merged_into_base(w.model, merged):
            return {"accuracy": score(w, cfg, task)}
    return run


def _routed(make: Callable) -> Callable:
    """A router whose scope decides per layer from the hidden states (Arrow, MBC): it encloses
    the whole evaluation, so the generation's length sorting does not matter."""
    def run(w: World, cfg: Config, task: str, pool) -> dict:
        router, info = make(w, cfg, task, pool)
        with router.scope(w.model, {}):
            acc = score(w, cfg, task)
        return {"accuracy": acc, **info, **_usage(router)}
    return run


def _usage(router) -> dict:
    """Mean routing weight per adapter over the scored rows, when the router recorded it."""
    decisions = getattr(router, "decisions", None) or []
    if not decisions:
        return {}
    total: dict[str, float] = {}
    for d in decisions:
        for n, v in d.weights.items():
            total[n] = total.get(n, 0.0) + v / len(decisions)
    return {"usage": {n: round(v, 3) for n, v in sorted(total.items(), key=lambda kv: -kv[1])}}


def _arrow(top_k: int) -> Callable:
    def make(w: World, cfg: Config, task: str, pool):
        from deltakit.route.arrow import Arrow
        return Arrow.from_library(w.lib, [w.refs[n] for n in pool], w.model, top_k=top_k,
                                  temperature=cfg.arrow_temperature), {}
    return _routed(make)


def user_text(example) -> str:
    from deltakit.train.instruct import to_messages
    return "\n".join(m["content"] for m in to_messages(example, "example") if m["role"] == "user")


_RETRIEVERS: dict[tuple, object] = {}


def retrieval(w: World, cfg: Config, task: str, pool) -> dict:
    """AdapterSwap: each dev row goes to the adapter whose description and train examples its text
    is most like (the base model's mean-pooled hidden states, cosine, top-1)."""
    from deltakit.route.retrieval import Retrieval
    key = tuple(pool)
    if key not in _RETRIEVERS:
        examples = {n: [user_text(ex) for ex in w.train[n][: cfg.retrieval_examples]] for n in pool}
        _RETRIEVERS[key] = Retrieval.from_library(w.lib, [w.refs[n] for n in pool], w.model, groups=["bench"],
                                                  tokenizer=w.tok, examples=examples, top_k=1)
    router = _RETRIEVERS[key]
    names, weights = router.route([user_text(ex) for ex in w.dev[task]])
    picked = weights.argmax(-1)
    share = {names[i]: round(float((picked == i).float().mean()), 3) for i in picked.unique().tolist()}
    return {"accuracy": score(w, cfg, task, routing=(names, weights)), "usage": share}


def _pool_tag(w: World, pool) -> str:
    """A short name for an adapter pool: 'all', or 'no-<task>' for leave-one-task-out."""
    missing = [n for n in w.names if n not in pool]
    return "all" if not missing else "no-" + "-".join(missing)


_MBC: dict[tuple, object] = {}


def _mbc_router(w: World, cfg: Config, pool):
    """MBC over ``pool``: k-means of the adapters by the cosine of their dW, one merged adapter per
    cluster (added to the library, lineage 'merge'), Arrow top-1 among the cluster adapters."""
    from deltakit.route.mbc import MBC, build_cluster_adapters, cluster_library
    key = tuple(pool)
    if key not in _MBC:
        clustering = cluster_library(w.lib, min(cfg.clusters, len(pool)), refs=[w.refs[n] for n in pool],
                                     seed=cfg.seed)
        entries = build_cluster_adapters(w.lib, clustering, w.model, prefix=f"mbc-{_pool_tag(w, pool)}")
        router = MBC.from_library(w.lib, w.model, refs=[e.ref for e in entries], top_k=1,
                                  temperature=cfg.arrow_temperature)
        members = {e.name: clustering.members(k) for k, e in enumerate(entries)}
        _MBC[key] = (router, {"clusters": {n: [m.split("@")[0] for m in ms] for n, ms in members.items()}})
    return _MBC[key]


def mbc(w: World, cfg: Config, task: str, pool) -> dict:
    return _routed(lambda w, cfg, task, pool: _mbc_router(w, cfg, pool))(w, cfg, task, pool)


def _lorahub(shots: int) -> Callable:
    def run(w: World, cfg: Config, task: str, pool) -> dict:
        """LoraHub: weights over the pool for ``task`` from ``shots`` train examples (CMA-ES on their
        loss, the paper's 40 evaluations), then the composed LoRA answers the dev rows."""
        import deltakit as dk
        from deltakit.route.lorahub import LoraHub
        from deltakit.train.instruct import InstructionDataset

        ds = InstructionDataset(w.train[task][:shots], w.tok, max_length=256)
        batches = [ds.collate([ds[i] for i in range(len(ds))])]
        router = LoraHub.fit(w.model, pool, batches, iterations=cfg.lorahub_iterations, seed=cfg.seed,
                             composed_name="lorahub", progress=False)
        try:
            acc = score(w, cfg, task, adapters="lorahub")
        finally:
            dk.detach(w.model, "lorahub")
        ws = {n: round(float(x), 3) for n, x in zip(pool, router.weights)}
        return {"accuracy": acc, "weights": ws, "best_objective": round(router.best, 4)}
    return run


SYSTEM_FNS: dict[str, Callable] = {"mbc": mbc, "lorahub_5": _lorahub(5), "lorahub_20": _lorahub(20),
"base": base, "oracle": oracle, "uniform": _merged("linear"),
                                   "ties": _merged("ties"), "arrow_top1": _arrow(1), "arrow_top2": _arrow(2),
                                   "retrieval": retrieval}


def overhead_settings(w: World, cfg: Config) -> dict:
    """Label -> (scope factory, generate_ids keywords); the first is the reference."""
    import torch

    k = len(w.names)
    n = cfg.overhead_prompts
    settings = {"one adapter (unmerged)": (contextlib.nullcontext, {"adapters": w.names[0]}),
                f"all {k} adapters, fixed weights": (contextlib.nullcontext,
                                                     {"routing": (w.names, torch.full((n, k), 1.0 / k))})}
    from deltakit.route.arrow import Arrow
    for top in (1, 2):
        router = Arrow.from_library(w.lib, list(w.refs.values()), w.model, top_k=top,
                                    temperature=cfg.arrow_temperature)
        settings[f"Arrow top-{top} over {k}"] = (lambda r=router: r.scope(w.model, {}), {})
    return settings
