"""Fingerprints of a base model: is this the base an adapter was trained on?

An adapter's outputs depend on every tensor of the base, not only on the ones it targets
(an FFN or embedding that differs changes what a LoRA on the attention sees), so the
fingerprint covers the whole base: every parameter and persistent buffer, by its plain
name (deltakit wrappers are transparent, merged deltas are taken out).

Hashing every byte of a 7B model takes seconds, so the default hashes, per tensor, its
name, shape, dtype and a fixed strided sample of at most ``SAMPLE`` elements (the same
positions every time); a fine-tuned or different base differs almost everywhere, so the
sample sees it. ``full=True`` hashes every byte. The string says which it is
(``sample-v2:`` / ``full-v2:``), and :func:`fingerprint_matches` recomputes the same kind.

Files written before version 2 hold :func:`targets_fingerprint` (every byte of the
targeted tensors only); they are still checked that way.
"""
from __future__ import annotations

import hashlib
from collections.abc import Callable, Iterable, Iterator, Sequence

import torch
from torch import Tensor, nn

from .layer import DeltaLayer

__all__ = ["SAMPLE", "plain_tensors", "model_fingerprint", "tensors_fingerprint", "targets_fingerprint",
           "fingerprint_matches"]

SAMPLE = 1 << 14  # elements hashed per tensor by default


def plain_tensors(model: nn.Module) -> Iterator[tuple[str, Tensor]]:
    """``(name, tensor)`` of the base model as it was before any adapter: parameters and
    persistent buffers under their plain names, originals of merged layers, no delta tensors."""
    seen: set[int] = set()

    def walk(module: nn.Module, prefix: str):
        if isinstance(module, DeltaLayer):
            yield from _direct(module.base, prefix, module.base_params())
            for n, child in module.base.named_children():
                yield from walk(child, f"{prefix}{n}.")
            return
        yield from _direct(module, prefix, None)
        for n, child in module.named_children():
            yield from walk(child, f"{prefix}{n}.")

    for name, t in walk(model, ""):
        if id(t) not in seen:  # tied weights count once, under their first name
            seen.add(id(t))
            yield name, t


def _direct(module: nn.Module, prefix: str, params: dict[str, Tensor] | None):
    params = params if params is not None else {k: p for k, p in module.named_parameters(recurse=False)}
    for k, p in params.items():
        yield f"{prefix}{k}", p.detach()
    persistent = set(module._buffers) - set(getattr(module, "_non_persistent_buffers_set", ()))
    for k, b in module.named_buffers(recurse=False):
        if k in persistent and b is not None:
            yield f"{prefix}{k}", b.detach()


def _sample(t: Tensor, n: int) -> Tensor:
    flat = t.reshape(-1)
    if flat.numel() <= n:
        return flat
    # integer positions i * (N - 1) // (n - 1): exact, and the same on every device
    idx = torch.arange(n, dtype=torch.int64, device=flat.device) * (flat.numel() - 1) // (n - 1)
    return flat.index_select(0, idx)


def _update(h, name: str, t: Tensor, full: bool) -> None:
    h.update(f"{name}|{tuple(t.shape)}|{t.dtype}|".encode())
    data = (t.reshape(-1) if full else _sample(t, SAMPLE)).to("cpu").contiguous()
    h.update(data.view(torch.uint8).numpy().tobytes() if data.numel() else b"")


def model_fingerprint(model: nn.Module, *, exclude: Iterable[str] = (), full: bool = False) -> str:
    """Fingerprint of the whole base (see the module docstring). ``exclude``: module paths whose
    direct tensors the adapter replaces outright (``modules_to_save``), so they do not count."""
    tensors = dict(plain_tensors(model))
    return tensors_fingerprint(tensors, tensors.__getitem__, exclude=exclude, full=full)


def tensors_fingerprint(names: Iterable[str], get: Callable[[str], Tensor], *, exclude: Iterable[str] = (),
                        full: bool = False) -> str:
    """The same fingerprint over named tensors fetched one at a time by ``get(name)``, so a
    checkpoint's tensors hash as the model they load into does (a lazy ``get``, e.g. a memory
    map, reads only the sampled elements)."""
    skip = set(exclude)
    h = hashlib.sha256()
    for name in sorted(names):
        if name.rpartition(".")[0] not in skip:
            _update(h, name, get(name), full)
    return f"{'full' if full else 'sample'}-v2:{h.hexdigest()}"


def targets_fingerprint(model: nn.Module, paths: Sequence[str]) -> str:
    """The version-1 fingerprint: sha256 over every byte of the targets' original parameters."""
    h = hashlib.sha256()
    for path in sorted(paths):
        m = model.get_submodule(path)
        params = m.base_params() if isinstance(m, DeltaLayer) else {
            k: p.detach() for k, p in m.named_parameters(recurse=False)}
        for k in sorted(params):
            t = params[k].detach().to("cpu").contiguous()
            h.update(f"{path}.{k}|{tuple(t.shape)}|{t.dtype}|".encode())
            h.update(t.view(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def fingerprint_matches(model: nn.Module, recorded: str, *, targets: Sequence[str],
                        exclude: Iterable[str] = ()) -> tuple[bool, str]:
    """``(same, computed)``: recompute ``recorded``'s kind of fingerprint on ``model``."""
    if recorded.startswith(("sample-v2:", "full-v2:")):
        now = model_fingerprint(model, exclude=exclude, full=recorded.startswith("full-"))
    else:
        now = targets_fingerprint(model, targets)
    return now == recorded, now
