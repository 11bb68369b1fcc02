"""Settings of the routing benchmark: the library, the dev subsample, the routers' knobs."""
from __future__ import annotations

from dataclasses import dataclass

__all__ = ["Config", "QUICK", "SYSTEMS"]

# every system the report can hold, in table order; "loo_" ones run leave-one-task-out
SYSTEMS = ("base", "oracle", "uniform", "ties", "arrow_top1", "arrow_top2", "mbc", "retrieval",
           "lorahub_5", "lorahub_20",
           "loo_uniform", "loo_ties", "loo_arrow_top1", "loo_arrow_top2", "loo_mbc", "loo_retrieval",
           "loo_lorahub_5", "loo_lorahub_20")


@dataclass(frozen=True)
class Config:
    adapters: str = "runs/llm_tasks"          # bench/llm_tasks.py's per-task SmolLM2 LoRAs
    library: str = "runs/routing/library"     # the AdapterLibrary the benchmark builds from them
    tasks: tuple[str, ...] = ("sst2", "cola", "mrpc", "rte", "qnli", "subj", "trec", "ag_news")
    n_dev: int = 50
    max_new_tokens: int = 4
    batch_size: int = 16
    arrow_temperature: float = 1.0
    clusters: int = 3                          # MBC: clusters of the 8 adapters (3: what their dW cosines show)
    retrieval_examples: int = 16               # train rows per adapter that describe it for retrieval
    lorahub_iterations: int = 40               # the paper's budget
    lorahub_shots: tuple[int, ...] = (5, 20)
    overhead_prompts: int = 16
    overhead_new_tokens: int = 16
    overhead_rounds: int = 3
    systems: tuple[str, ...] = SYSTEMS
    seed: int = 0
    threads: int = 2
    quick: bool = False


QUICK = dict(tasks=("sst2", "ag_news", "subj"), n_dev=8, clusters=2, retrieval_examples=4, lorahub_iterations=4,
             lorahub_shots=(5,), overhead_prompts=4, overhead_new_tokens=4, overhead_rounds=1, quick=True)
