"""Model merging: pure per-parameter methods, a streaming executor and recipes."""
from ._layers import layer_index, lines_factor
from ._parts import CONSENSUS, RESCALE, SPARSIFY, GTAConfig, gta_merge
from ._registry import (MergeConfigError, MergeContext, MergeMethod, build_config, get_merge, list_merges,
                        register_merge)
from .executor import MergePlan, merge_checkpoints, merge_task_vectors, merge_tensors
from .recipe import Recipe, RecipeError, load_recipe, run_recipe
from .stats import collect_grams, estimate_fisher, stack_stats
from ._adamerging import AdaMergingResult, adamerging, prediction_entropy
from ._evolve import EvolveResult, evolve_coefficients, layer_groups
from ._graft import GraftResult, localize_skill
from ._lcsc import LcscResult, lcsc_search
from ._pleas import PleasResult, match_units, pleas_merge
from ._surgery import SurgeryResult, model_surgery, pooled_hidden_states, surgery_delta, train_probe

__all__ = [
    "register_merge", "get_merge", "list_merges", "build_config", "MergeMethod", "MergeContext",
    "MergeConfigError", "GTAConfig", "gta_merge", "SPARSIFY", "RESCALE", "CONSENSUS",
    "MergePlan", "merge_checkpoints", "merge_tensors", "merge_task_vectors",
    "Recipe", "RecipeError", "load_recipe", "run_recipe", "layer_index", "lines_factor",
    "estimate_fisher", "collect_grams", "stack_stats", "adamerging", "AdaMergingResult",
    "prediction_entropy", "evolve_coefficients", "EvolveResult", "layer_groups", "localize_skill", "GraftResult",
    "lcsc_search", "LcscResult", "model_surgery", "SurgeryResult", "pooled_hidden_states", "surgery_delta",
    "train_probe", "pleas_merge", "PleasResult", "match_units",
]

