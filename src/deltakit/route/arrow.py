"""Arrow: per-layer, per-token routing over a library of LoRAs, with no training.

Ostapenko et al. 2024, "Towards Modular LLMs by Building and Reusing a Library of LoRAs",
https://arxiv.org/abs/2405.11157. Each adapter's prototype at a layer is the top right-singular
vector ``v`` of that layer's ``dW`` (computed once, when the adapter entered the library:
:mod:`deltakit.library._routing`; it is read from the library here, never recomputed). A
token ``x`` entering a layer scores every adapter present there by ``|<x, v>|`` (a singular
vector's sign is arbitrary), keeps the ``top_k`` best and mixes them with
``softmax(score / temperature)`` over the kept ones; the others get weight 0 at that layer::

    w_l(x) = softmax_{top_k}(|x P_l^T| / temperature)          # P_l (K_l, in), w_l (..., K_l)

Every adapted layer routes on its own input, so one token may use different adapters in
different layers. A layer the adapters replace in full (``modules_to_save``, e.g. each task's
classification head) has no prototype; there each row mixes the adapters by its mean Arrow
weight over the tokens and layers routed so far in the scope (an adapter with no copy of that
layer leaves its share to the base layer, as in any routed forward). Adapters absent from a
layer (mixed targets) are not candidates there; any mix of ranks is fine. peft's Arrow
(``peft.tuners.lora.arrow``) computes the same weights but needs equal ranks and targets,
routes no heads, and re-derives the prototypes by a 15-step power iteration in memory.

>>> router = Arrow.from_library(lib, ["sst2", "ag_news"], model, top_k=1)   # doctest: +SKIP
>>> with router.scope(model, batch):                                      # doctest: +SKIP
...     logits = model(**batch).logits
>>> router.decisions[0].weights                                           # doctest: +SKIP
{'sst2': 0.83, 'ag_news': 0.17}
"""
from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from ..core.adapter import adapters, routed
from ..core.layer import DeltaLayer
from ._base import Decision, Router, RoutingError, _decision, register_router

__all__ = ["Arrow", "arrow_weights"]

PROTOTYPE = "prototype."  # key prefix of a library entry's routing file


def arrow_weights(scores: Tensor, top_k: int, temperature: float) -> Tensor:
    """Softmax over the ``top_k`` largest scores (``/ temperature``), 0 elsewhere.

    scores: ``(..., K)`` (already ``|<x, prototype>|``); returns the same shape, rows summing to 1.
    """
    k = min(top_k, scores.shape[-1])
    top, idx = scores.topk(k, dim=-1)
    return torch.zeros_like(scores).scatter(-1, idx, torch.softmax(top / temperature, dim=-1))


@dataclass
class _Layer:
    """One adapted layer's routing table: the prototypes of the adapters present there."""

    path: str
    protos: Tensor | None  # (K_l, in) float32; None for a layer copied in full (a head)
    cols: Tensor           # (K_l,) columns of these adapters among the router's K names
    cast: dict = field(default_factory=dict)  # device -> protos on that device

    def on(self, device: torch.device) -> tuple[Tensor, Tensor]:
        if device not in self.cast:
            self.cast[device] = (self.protos.to(device), self.cols.to(device))
        return self.cast[device]


class _ArrowFn:
    """The callable a DeltaLayer calls inside the routing scope: ``fn(layer, x) -> (..., K)``.

    It also keeps a reference to every layer's weights (float32, no autograd history) so that
    the scope turns them into :class:`Decision` records once, afterwards; the forward pays
    nothing more for the record. One instance per scope: concurrent scopes do not share state
    (the router's :attr:`decisions` holds the last scope's).
    """

    def __init__(self, table: dict[int, _Layer], k: int, top_k: int, temperature: float,
                 mask: Tensor | None = None) -> None:
        self.table, self.k, self.top_k, self.temperature = table, k, top_k, temperature
        self.mask = mask if isinstance(mask, Tensor) and mask.dim() == 2 else None  # (B, T) of the prompt
        self.first: int | None = None  # the first layer routed: each time it runs, a forward starts
        self.forwards: list[dict[int, list[Tensor]]] = []  # per forward: layer -> its (B, T, K) weights
        self.rows: Tensor | None = None  # (B, K): sum over routed layer calls of each row's token mean
        self.calls = 0
        self.heads = any(e.protos is None for e in table.values())  # only heads need the row sums

    def __call__(self, layer: nn.Module, x: Tensor) -> Tensor:
        entry = self.table.get(id(layer))
        if entry is None:
            raise RoutingError("Arrow was called by a layer it has no prototypes for; build the router's "
                               "weights from the same model that runs the forward")
        if entry.protos is None:
            return self._head(entry, x)
        if not isinstance(x, Tensor) or not x.is_floating_point() or x.shape[-1] != entry.protos.shape[1]:
            found = f"{tuple(x.shape)} {x.dtype}" if isinstance(x, Tensor) else type(x).__name__
            raise RoutingError(f"Arrow at {entry.path}: prototypes of width {entry.protos.shape[1]} cannot score "
                               f"this layer's input {found} (Arrow routes float inputs of the prototypes' width)")
        protos, cols = entry.on(x.device)
        w_l = arrow_weights((x.detach().float() @ protos.T).abs(), self.top_k, self.temperature)  # (..., K_l)
        w = w_l.new_zeros(*w_l.shape[:-1], self.k).index_copy_(-1, cols, w_l)  # (..., K)
        w3 = w if w.dim() > 2 else w.unsqueeze(-2)  # (B, T, K)
        if self.first is None:
            self.first = id(layer)
        if id(layer) == self.first or not self.forwards:
            self.forwards.append({})
        self.forwards[-1].setdefault(id(layer), []).append(w3)
        if self.heads:
            self._add_rows(w3)
        return w

    def _add_rows(self, w3: Tensor) -> None:
        """Accumulate each row's mean weight over its real tokens (for heads copied in full)."""
        m = self.mask
        if m is not None and tuple(m.shape) == tuple(w3.shape[:2]):
            m = m.to(w3.device, w3.dtype).unsqueeze(-1)  # (B, T, 1)
            row = (w3 * m).sum(1) / m.sum(1).clamp(min=1)
        else:
            row = w3.reshape(w3.shape[0], -1, self.k).mean(1)
        if self.rows is None or self.rows.shape != row.shape:
            self.rows, self.calls = row, 1
        else:
            self.rows, self.calls = self.rows + row, self.calls + 1

    def _head(self, entry: _Layer, x) -> Tensor:
        """A layer copied in full: each row's mean weight so far, ``(B, 1, ..., K)`` to broadcast."""
        if self.rows is None:
            raise RoutingError(f"Arrow reached {entry.path} (copied in full, no prototype) before any routed layer")
        lead = tuple(x.shape[:-1]) if isinstance(x, Tensor) and x.dim() > 1 else (self.rows.shape[0],)
        if lead[0] != self.rows.shape[0]:
            raise RoutingError(f"Arrow at {entry.path}: {lead[0]} rows, the routed layers saw {self.rows.shape[0]}")
        w = (self.rows / self.calls).reshape(lead[0], *([1] * (len(lead) - 1)), self.k)
        return w.to(x.device) if isinstance(x, Tensor) else w

    def decisions(self, names: Sequence[str], mask: Tensor | None) -> list[Decision]:
        """One :class:`Decision` per row of every sequence of forwards (see :meth:`_sequences`),
        in the order they ran: the mean weight per adapter over the row's tokens and the routed
        layers and, per token, the adapter with the largest mean weight over layers. Tokens that
        ``mask`` (the scope's batch's attention mask) marks as padding are left out."""
        out = []
        for parts, per_token in self._sequences():
            w = torch.cat(parts, dim=1)  # (B, T, K)
            keep = _token_mask(mask, w.shape[0], w.shape[1]) if tuple(parts[0].shape[:2]) == _shape(mask) else None
            for b in range(w.shape[0]):
                wb = w[b][keep[b]] if keep is not None else w[b]
                d = _decision(names, wb.mean(0) if len(wb) else wb.new_zeros(w.shape[-1]))
                d.tokens = [names[i] for i in wb.argmax(-1).tolist()] if per_token else None
                out.append(d)
        return out

    def _sequences(self) -> list[tuple[list[Tensor], bool]]:
        """The forwards grouped by rows: a forward of the same rows and one new token (a decoding
        step with a KV cache) continues the previous group, any other starts new rows (a new
        batch; decoding without a cache, which re-feeds every token, counts each step anew).
        Each forward is the mean over layers ``(B, T, K)``; where its layers saw different
        lengths (encoder-decoder), their token means ``(B, 1, K)`` and no per-token record."""
        groups: list[tuple[list[Tensor], bool]] = []
        for f in self.forwards:
            per_layer = [torch.cat(chunks, dim=-2) for chunks in f.values()]  # each (B, T_l, K)
            per_token = len({w.shape for w in per_layer}) == 1
            w = torch.stack(per_layer if per_token else [p.mean(-2, keepdim=True) for p in per_layer]).mean(0)
            prev = groups[-1][0] if groups else None
            if prev is not None and per_token and groups[-1][1] and w.shape[1] == 1 and w.shape[0] == prev[0].shape[0]:
                prev.append(w)
            else:
                groups.append(([w], per_token))
        return groups


def _shape(mask: Tensor | None) -> tuple[int, ...] | None:
    return tuple(mask.shape) if isinstance(mask, Tensor) else None


def _token_mask(mask: Tensor | None, batch: int, tokens: int) -> Tensor | None:
    """The batch's attention mask ``(B, T0)`` extended over tokens generated after the prompt
    (all real), as booleans ``(B, T)``; None when it does not describe these tokens."""
    if not isinstance(mask, Tensor) or mask.dim() != 2 or mask.shape[0] != batch or mask.shape[1] > tokens:
        return None
    extra = torch.ones(batch, tokens - mask.shape[1], dtype=torch.bool, device=mask.device)
    return torch.cat([mask.bool(), extra], dim=1).cpu()


@register_router("arrow")
@dataclass
class Arrow(Router):
    """Arrow routing (see the module docstring).

    ``prototypes``: module path -> adapter name -> prototype ``(in,)``, as a library entry's
    routing file holds them (``prototype.<module path>``); ``top_k`` adapters per token and
    layer (peft defaults to 3; the paper's Arrow results mostly use top-k routing with small
    k); ``temperature`` of the softmax over the kept scores.
    """

    prototypes: Mapping[str, Mapping[str, Tensor]] = field(default_factory=dict, repr=False)
    top_k: int = 1
    temperature: float = 1.0

    def __post_init__(self) -> None:
        self.names = tuple(self.names)
        if not self.names or len(set(self.names)) != len(self.names):
            raise RoutingError(f"Arrow needs distinct adapter names, found {list(self.names)}")
        if isinstance(self.top_k, bool) or not isinstance(self.top_k, int) or self.top_k < 1:
            raise RoutingError(f"top_k: expected an integer >= 1, found {self.top_k!r}")
        if not isinstance(self.temperature, (int, float)) or not (0 < self.temperature < math.inf):
            raise RoutingError(f"temperature: expected a finite number > 0, found {self.temperature!r}")
        self.prototypes = {p: dict(by) for p, by in self.prototypes.items()}
        self._check_prototypes()

    def _check_prototypes(self) -> None:
        covered = set()
        for path, by in self.prototypes.items():
            for name, v in by.items():
                if name not in self.names:
                    raise RoutingError(f"prototype for {name!r} at {path}: not one of the router's adapters "
                                       f"{list(self.names)}")
                if not isinstance(v, Tensor) or v.dim() != 1 or not v.is_floating_point():
                    found = tuple(v.shape) if isinstance(v, Tensor) else type(v).__name__
                    raise RoutingError(f"prototype for {name!r} at {path}: expected a float vector (in,), "
                                       f"found {found}")
                covered.add(name)
        missing = [n for n in self.names if n not in covered]
        if missing:
            raise RoutingError(f"Arrow has no prototype for adapters {missing}")

    @classmethod
    def from_library(cls, lib, refs: Sequence[str], model: nn.Module, *, top_k: int = 1,
                     temperature: float = 1.0) -> "Arrow":
        """Route over library entries ``refs`` with their stored prototypes.

        Each entry is attached to ``model`` under its entry name (inactive, frozen: the model's
        plain forward is unchanged) unless an adapter of that name is attached already (then it
        is taken to be that entry; :meth:`weights_for` checks that its layers match the stored
        prototypes).
        """
        entries = [lib.get(r) for r in refs]
        names = [e.name for e in entries]
        if not entries or len(set(names)) != len(names):
            raise RoutingError(f"Arrow needs library entries with distinct names, found {names}")
        attached = adapters(model)
        protos: dict[str, dict[str, Tensor]] = {}
        for e in entries:
            if e.name not in attached:
                lib.load(model, e.ref, name=e.name, activate=False, trainable=False)
            for key, v in lib.routing(e.ref).items():
                if key.startswith(PROTOTYPE):
                    protos.setdefault(key[len(PROTOTYPE):], {})[e.name] = v
        return cls(names=tuple(names), prototypes=protos, top_k=top_k, temperature=temperature)

    def describe(self) -> str:
        return (f"arrow: {len(self.names)} adapters ({', '.join(self.names)}), {len(self.prototypes)} layers, "
                f"top_k={self.top_k}, temperature={self.temperature:g}")

    def weights_for(self, model: nn.Module, batch: Mapping[str, Any] | None = None) -> _ArrowFn:
        """A callable ``fn(layer, x) -> (..., K)`` for :func:`deltakit.routed`, keyed by the
        DeltaLayers of ``model``; the adapters each layer holds must match the prototypes."""
        table: dict[int, _Layer] = {}
        attached = adapters(model)
        unmatched = {(p, n) for p, by in self.prototypes.items() for n in by}
        for path, layer in model.named_modules():
            if not isinstance(layer, DeltaLayer):
                continue
            present = [n for n in self.names if n in layer.deltas]
            if not present:
                continue
            by = self.prototypes.get(path, {})
            cols = torch.tensor([self.names.index(n) for n in present])
            if not by and all(attached[n].targets.get(path) == "full" for n in present):
                table[id(layer)] = _Layer(path, None, cols)  # a head copied in full: see _ArrowFn._head
                continue
            lacking = [n for n in present if n not in by]
            if lacking:
                raise RoutingError(f"adapters {lacking} are attached at {path} but have no Arrow prototype there "
                                   "(not the library entries the router was built from?)")
            unmatched -= {(path, n) for n in present}
            table[id(layer)] = _Layer(path, torch.stack([by[n].float() for n in present]), cols)
        if unmatched:
            path, name = sorted(unmatched)[0]
            raise RoutingError(f"adapter {name!r} has an Arrow prototype at {path} but is not attached there "
                               f"({len(unmatched)} such layers)")
        mask = batch.get("attention_mask") if isinstance(batch, Mapping) else None
        return _ArrowFn(table, len(self.names), self.top_k, float(self.temperature), mask)

    @contextlib.contextmanager
    def scope(self, model: nn.Module, batch: Mapping[str, Any] | None = None) -> Iterator[None]:
        """Within the block, ``model``'s forwards are Arrow-routed; on leaving it,
        :attr:`decisions` holds one :class:`Decision` per row (with per-token top adapters)."""
        fn = self.weights_for(model, batch)
        with routed(model, self.names, fn):
            yield
        self.decisions = fn.decisions(self.names, fn.mask)
