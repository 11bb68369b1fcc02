"""Model merging: pure per-parameter methods, a streaming executor and recipes."""
from ._layers import layer_index, lines_factor
from ._parts import CONSENSUS, RESCALE, SPARSIFY, GTAConfig, gta_merge
from ._registry import (MergeConfigError, MergeContext, MergeMethod, build_config, get_merge, list_merges,
                        register_merge)
from .executor import MergePlan, merge_checkpoints, merge_tensors
from .recipe import Recipe, RecipeError, load_recipe, run_recipe
from .stats import collect_grams, estimate_fisher, stack_stats
from ._adamerging import AdaMergingResult, adamerging, prediction_entropy
from ._evolve import EvolveResult, evolve_coefficients, layer_groups

__all__ = [
    "register_merge", "get_merge", "list_merges", "build_config", "MergeMethod", "MergeContext",
    "MergeConfigError", "GTAConfig", "gta_merge", "SPARSIFY", "RESCALE", "CONSENSUS",
    "MergePlan", "merge_checkpoints", "merge_tensors", "merge_task_vectors",
    "Recipe", "RecipeError", "load_recipe", "run_recipe", "layer_index", "lines_factor",
    "estimate_fisher", "collect_grams", "stack_stats", "adamerging", "AdaMergingResult",
    "prediction_entropy", "evolve_coefficients", "EvolveResult", "layer_groups",
]



def merge_task_vectors(method: str, task_vectors, cfg=None, *, seed: int | None = None,
                       lines: tuple[float, float] | None = None, stats_for=None):
    """Merge K task vectors lazily into one (base = 0, so the result is the merged dW).

    ``lines=(alpha, beta)`` applies LiNeS depth scaling to the merged dW (see :func:`lines_factor`).

    ``merge_task_vectors("ties", [tv1, tv2], TiesConfig(density=0.2))`` -> TaskVector; each
    entry is computed on access. Only names present in every task vector are merged.
    ``stats_for(name) -> {"fisher" | "gram": (K, ...)}`` feeds data-dependent methods
    (e.g. ``stack_stats("gram", [collect_grams(m, data) for m in models])``).
    """
    from deltakit.taskvec import TaskVector, as_dense

    from ._layers import count_layers
    from .executor import tensor_generator

    m = get_merge(method)
    names = [n for n in task_vectors[0].keys() if all(n in tv for tv in task_vectors[1:])]
    num_layers = count_layers(names)
    m.require_stats(stats_for, names)

    def entry(n: str):
        def thunk():
            x = [as_dense(tv.get(n)) for tv in task_vectors]
            ctx = MergeContext(name=n, layer=layer_index(n), num_layers=num_layers,
                               generator=tensor_generator(seed, n), stats=stats_for(n) if stats_for else {})
            out = merge_tensors(m, x, None, cfg, ctx)
            return out if lines is None else out * lines_factor(n, ctx.layer, num_layers, *lines)
        return thunk

    return TaskVector({n: entry(n) for n in names})
