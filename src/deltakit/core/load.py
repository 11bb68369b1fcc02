"""Attach an adapter from a state dict: the one path every loader takes.

deltakit's own adapter files and imported peft adapters both come down to "a method
config, the targets, and tensors keyed like :meth:`Adapter.state_dict`". This builds the
deltas off the model, checks every expected tensor (present, same shape, finite) and
that nothing is left over, fills them, and only then inserts: any error leaves the
model exactly as it was.
"""
from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
from torch import Tensor, nn

from .adapter import SHARED, Adapter, adapters, build_deltas, insert
from .delta import Delta
from .registry import DeltaConfig, get_method

__all__ = ["AdapterLoadError", "attach_state"]


class AdapterLoadError(ValueError):
    """An adapter does not fit the model it is loaded into (targets, shapes, tensors, base)."""


def attach_state(model: nn.Module, config: DeltaConfig, state: Mapping[str, Tensor], *,
                 name: str, targets: Sequence[str], full_targets: Sequence[str] = (),
                 activate: bool = True, trainable: bool = True, source: str = "state dict") -> Adapter:
    """Attach adapter ``name`` of ``config``'s method on ``targets`` (plus ``full_targets`` as
    ``modules_to_save``), with its tensors from ``state`` (keys as ``Adapter.state_dict()``).

    ``source`` names where the tensors came from in error messages (a file path).
    """
    if name in adapters(model):
        raise AdapterLoadError(f"an adapter named {name!r} is already attached; pass another name")
    spec = get_method(config.method)
    shared, deltas = build_deltas(model, config, spec, list(targets), list(full_targets))
    groups: dict[str, nn.Module] = {SHARED: shared} if shared is not None else {}
    groups.update({p: d for p, (_, d) in deltas.items()})
    for prefix, module in groups.items():
        if isinstance(module, Delta):
            module.adopt_state({k[len(prefix) + 1:]: v for k, v in state.items() if k.startswith(prefix + ".")})
    filled = {prefix: _take(module, prefix, state, source) for prefix, module in groups.items()}
    expected = {f"{prefix}.{k}" for prefix, sub in filled.items() for k in sub}
    extra = sorted(set(state) - expected)
    if extra:
        raise AdapterLoadError(f"{source}: unexpected tensor(s) {extra[:3]}{'...' if len(extra) > 3 else ''} "
                                f"for method {spec.name!r} on {len(targets)} target(s)")
    for prefix, module in groups.items():
        module.load_state_dict(filled[prefix], strict=True)
    adapter = insert(model, name, config, spec, (shared, deltas), activate=activate)
    if not trainable:
        for p in adapter.parameters():
            p.requires_grad_(False)
    return adapter


def _take(module: nn.Module, prefix: str, state: Mapping[str, Tensor], source: str) -> dict[str, Tensor]:
    """The tensors of ``module`` (a delta or the shared part) from ``state``, checked."""
    sub = {}
    for k, want in module.state_dict().items():
        key = f"{prefix}.{k}"
        if key not in state:
            raise AdapterLoadError(f"{source}: missing tensor {key!r}")
        got = state[key]
        if tuple(got.shape) != tuple(want.shape):
            raise AdapterLoadError(f"{source}: tensor {key!r} has shape {tuple(got.shape)}, "
                                    f"expected {tuple(want.shape)}")
        if got.is_floating_point() and not bool(torch.isfinite(got).all()):
            raise AdapterLoadError(f"{source}: tensor {key!r} contains NaN/inf")
        sub[k] = got
    return sub
