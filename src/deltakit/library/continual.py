"""Continual PEFT on top of the library: earlier tasks' adapters come from the store.

C-LoRA (:mod:`deltakit.methods.c_lora`) trains task t's LoRA with the earlier tasks' LoRAs
attached, frozen and active, and a penalty built from their updates. The earlier adapters are
library entries (content-addressed, sha-checked, base-checked on load), so a continual run is
reproducible from references alone.
"""
from __future__ import annotations

from collections.abc import Sequence

from torch import nn

from ..core.adapter import Adapter, attach, set_active
from ..methods.c_lora import CLoraConfig, ForgetPenalty
from .library import AdapterLibrary

__all__ = ["continue_from_library"]


def continue_from_library(model: nn.Module, library: AdapterLibrary, refs: Sequence[str], config: CLoraConfig,
                          name: str) -> tuple[Adapter, list[Adapter], ForgetPenalty]:
    """Attach library entries ``refs`` (earlier tasks, frozen) and a new C-LoRA adapter ``name``;
    all of them active. Returns ``(new adapter, earlier adapters, its ForgetPenalty)``."""
    if not isinstance(config, CLoraConfig):
        raise TypeError(f"continue_from_library: expected a CLoraConfig, found {type(config).__name__}")
    entries = [library.get(ref) for ref in refs]
    previous = [library.load(model, e.ref, name=f"{e.name}-v{e.version}", trainable=False, activate=False)
                for e in entries]
    adapter = attach(model, config, name=name)
    set_active(model, [a.name for a in previous] + [adapter.name])
    return adapter, previous, ForgetPenalty(adapter, previous)
