"""deltakit: train, ship, merge, compress, serve and search parameter-efficient deltas.

>>> import torch, deltakit as dk
>>> model = torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.ReLU(), torch.nn.Linear(8, 2))
>>> adapter = dk.attach(model, dk.LoraConfig(r=4, targets=["0", "2"]), name="task")
>>> dk.param_counts(model)
(104, 194)
"""
from ._version import __version__

from .core.adapter import (Adapter, active, adapters, attach, detach, disabled,
                           get_adapter, merge_and_detach, mixed_batch, param_counts, routed, set_active)
from .core.fingerprint import model_fingerprint
from .core.load import attach_state
from .core.delta import ActivationDelta, BuildContext, Delta, WeightDelta
from .core.layer import DeltaLayer, DeltaStateError
from .core.registry import ConfigError, DeltaConfig, get_method, register_method
from .core.registry import methods as list_methods
from .core.targets import TargetError, select_targets
from .io.adapter_files import AdapterLoadError, load_adapter, save_adapter
from .io.files import DeltakitFileError
from .methods.full import FullConfig
from .methods.lora import LoraConfig
from .taskvec import LazyCheckpoint, LowRank, TaskVector
from .train import TrainResult, evaluate, fit
from .train.generate import generate

__all__ = [
    "__version__",
    "Adapter", "attach", "detach", "adapters", "get_adapter", "set_active", "active", "disabled",
    "mixed_batch", "routed", "param_counts", "merge_and_detach", "model_fingerprint", "attach_state",
    "Delta", "WeightDelta", "ActivationDelta", "BuildContext", "DeltaLayer", "DeltaStateError",
    "DeltaConfig", "ConfigError", "register_method", "get_method", "list_methods",
    "TargetError", "select_targets",
    "load_adapter", "save_adapter", "AdapterLoadError", "DeltakitFileError",
    "LoraConfig", "FullConfig",
    "fit", "evaluate", "TrainResult", "generate",
    "TaskVector", "LazyCheckpoint", "LowRank",
]
