"""Routing between the adapters of a library: one router per file, registered by name.

Every router turns inputs into soft weights over K attached adapters and applies them through
the core's per-call routing (:func:`deltakit.core.adapter.routed`): Arrow (per layer and token,
from the library's stored prototypes), MBC (clusters of the library, one merged adapter each),
Poly / MHR (learned routing over skill adapters), LoraHub (gradient-free weights for a new
task), retrieval (AdapterSwap: by input similarity, within the caller's access groups).
"""
from __future__ import annotations

import importlib
import pkgutil

from ._base import Decision, Router, RoutingError, get_router, list_routers, register_router

for _m in pkgutil.iter_modules(__path__):
    if not _m.name.startswith("_"):
        importlib.import_module(f"{__name__}.{_m.name}")

__all__ = ["Router", "Decision", "RoutingError", "register_router", "get_router", "list_routers"]
