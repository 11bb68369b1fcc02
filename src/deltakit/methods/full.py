"""Full fine-tuning as a method: the class lives in :mod:`deltakit.core.full` (the core
builds it for ``modules_to_save``); this module keeps the method's usual import path."""
from ..core.full import FullConfig, FullDelta

__all__ = ["FullConfig", "FullDelta"]
