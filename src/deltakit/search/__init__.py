"""Configuration search: spaces from the configs' declarations, Optuna studies, Pareto reports.

>>> from deltakit.search import build_space
>>> space = build_space({"methods": {"lora": {"r": [2, 32]}}})
>>> [(p.name, p.low, p.high, p.log) for p in space.methods["lora"].searched()][0]
('r', 2, 32, True)
"""
from .space import MethodSpace, Param, Space, SpaceError, TrainingConfig, build_space, method_space
from .spec import SearchSpec, load_spec, parse_spec

__all__ = ["Space", "MethodSpace", "Param", "SpaceError", "TrainingConfig", "build_space", "method_space",
           "SearchSpec", "load_spec", "parse_spec"]
