"""Retrieval routing with access control (AdapterSwap).

Fleshman et al. 2024, "AdapterSwap: Continuous Training of LLMs with Data Removal and
Access-Control Guarantees", https://arxiv.org/abs/2404.08417: one adapter per data partition;
a request may only use the adapters of the partitions its caller may access, chosen by how
well the request matches them; deleting data means removing (or retraining) just that
partition's adapter.

Here each adapter is described by texts (its library description and/or example inputs),
embedded once. A request's text is embedded the same way and scored by cosine similarity,
among the adapters the caller may access only::

    s_k = max_j cos(e(text), e(t_kj))      (pool="max": the best-matching example)
    s_k = cos(e(text), mean_j e(t_kj)/|.|)  (pool="mean": the centroid of its texts)
    w = top_k of s over accessible k, then softmax(s / temperature) or, temperature None, 1/top_k each

Access: an adapter with groups may be used by a caller presenting at least one of them; an
adapter with **no groups is public** (usable by every caller). The caller's ``groups`` must be
given explicitly (``()`` means "public adapters only"). An inaccessible adapter is never a
candidate: its weight is exactly 0 for every row however similar it is, it is not named in the
routed forward, and :meth:`Retrieval.from_library` does not even attach it. With no accessible
adapter at all the router raises :class:`RoutingError`, unless built with ``no_access="base"``
(then those requests run on the base model, adapters disabled).

Interface: :meth:`Retrieval.route_texts` ``(texts) -> (B, K)`` weights over all K names;
:meth:`Retrieval.route` ``(texts) -> (names, (B, K'))`` over the adapters used, for
``deltakit.routed`` or ``generate(routing=...)``; :meth:`weights_for` / :meth:`scope` read the
texts from ``batch["texts"]`` (one string per row, same order as the rows). Removing an adapter
from the library and rebuilding the router drops it.

>>> r = Retrieval.from_library(lib, None, model, groups=["clinic"], tokenizer=tok)   # doctest: +SKIP
>>> with r.scope(model, {"texts": prompts}):                                       # doctest: +SKIP
...     out = model(**enc)
"""
from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import torch
from torch import Tensor, nn

from ..core.adapter import adapters, disabled, routed
from ._base import Router, RoutingError, register_router

__all__ = ["Retrieval", "base_embedder"]

Embed = Callable[[list[str]], Tensor]


def base_embedder(model: nn.Module, tokenizer, *, max_length: int = 256, batch_size: int = 16) -> Embed:
    """``embed(texts) -> (N, d)``: the mean over real tokens of ``model``'s last hidden state,
    adapters disabled (the base model's own view of the text: no extra model to ship, works
    offline for any model that returns ``hidden_states``). A tokenizer without a pad token
    embeds one text at a time."""
    step = batch_size if getattr(tokenizer, "pad_token", None) is not None else 1
    device = next(model.parameters()).device

    @torch.no_grad()
    def embed(texts: list[str]) -> Tensor:
        out = []
        for i in range(0, len(texts), step):
            enc = tokenizer(list(texts[i:i + step]), return_tensors="pt", padding=step > 1, truncation=True,
                            max_length=max_length)
            ids, mask = enc["input_ids"].to(device), enc["attention_mask"].to(device)
            with disabled(model):
                h = _last_hidden(_call(model, ids, mask))
            m = mask.unsqueeze(-1).to(h.dtype)  # (n, T, 1)
            out.append(((h * m).sum(1) / m.sum(1).clamp(min=1)).float())
        return torch.cat(out)
    return embed


def _call(model: nn.Module, ids: Tensor, mask: Tensor) -> Any:
    try:
        return model(input_ids=ids, attention_mask=mask, output_hidden_states=True)
    except TypeError as e:  # not a transformers model: it takes no such keywords
        raise RoutingError(f"the default embedder needs a model that returns hidden_states (a transformers "
                           f"model); calling {type(model).__name__} failed ({e}): give embed= instead") from None


def _last_hidden(out: Any) -> Tensor:
    states = getattr(out, "hidden_states", None)
    if not states:
        raise RoutingError(f"the default embedder needs a model that returns hidden_states (a transformers model); "
                           f"found {type(out).__name__}: give embed= instead")
    return states[-1]


def _unit(x: Tensor) -> Tensor:
    return x / x.norm(dim=-1, keepdim=True).clamp(min=1e-12)


def _group_set(groups: Any, what: str) -> frozenset[str]:
    if groups is None or isinstance(groups, (str, bytes)) or not isinstance(groups, Iterable):
        raise RoutingError(f"{what}: expected a list of group names ([] for none), found {groups!r}")
    out = frozenset(groups)
    if not all(isinstance(g, str) and g for g in out):
        raise RoutingError(f"{what}: expected non-empty strings, found {sorted(map(repr, out))}")
    return out


@register_router("retrieval")
@dataclass
class Retrieval(Router):
    """Retrieval routing within the caller's access groups (see the module docstring).

    ``keys``: per adapter, the embeddings ``(n_k, d)`` of its texts; ``access``: per adapter,
    the groups that may use it (empty: public); ``groups``: the caller's groups (required);
    ``top_k`` adapters per row; ``temperature`` of the softmax over the kept similarities, or
    None for equal weights; ``pool``: how an adapter's several texts score; ``embed``: the text
    embedder for requests (the one ``keys`` came from); ``no_access``: ``"error"`` or ``"base"``.
    """

    keys: Sequence[Tensor] = field(default=(), repr=False)
    access: Sequence[Iterable[str]] = ()
    groups: Iterable[str] | None = None
    top_k: int = 1
    temperature: float | None = None
    pool: Literal["max", "mean"] = "max"
    embed: Embed | None = field(default=None, repr=False)
    no_access: Literal["error", "base"] = "error"

    def __post_init__(self) -> None:
        self.names = tuple(self.names)
        if not self.names or len(set(self.names)) != len(self.names):
            raise RoutingError(f"retrieval needs distinct adapter names, found {list(self.names)}")
        self.groups = _group_set(self.groups, "groups (the caller's access groups)")
        if len(self.access) != len(self.names):
            raise RoutingError(f"access: expected one group list per adapter ({len(self.names)}), "
                               f"found {len(self.access)}")
        self.access = tuple(_group_set(a, f"access groups of {n!r}") for n, a in zip(self.names, self.access))
        self._check_keys()
        self._check_options()
        self.candidates = tuple(i for i, a in enumerate(self.access) if not a or a & self.groups)

    def _check_keys(self) -> None:
        if len(self.keys) != len(self.names):
            raise RoutingError(f"keys: expected one (n, d) tensor per adapter ({len(self.names)}), "
                               f"found {len(self.keys)}")
        dims = set()
        for n, k in zip(self.names, self.keys):
            if not isinstance(k, Tensor) or k.dim() != 2 or k.shape[0] < 1 or not k.is_floating_point():
                found = tuple(k.shape) if isinstance(k, Tensor) else type(k).__name__
                raise RoutingError(f"keys of {n!r}: expected a float tensor (n >= 1, d), found {found}")
            dims.add(k.shape[1])
        if len(dims) != 1:
            raise RoutingError(f"keys: every adapter's embeddings need the same width, found {sorted(dims)}")
        self.keys = tuple(_unit(k.float()) for k in self.keys)

    def _check_options(self) -> None:
        if isinstance(self.top_k, bool) or not isinstance(self.top_k, int) or self.top_k < 1:
            raise RoutingError(f"top_k: expected an integer >= 1, found {self.top_k!r}")
        t = self.temperature
        if t is not None and (isinstance(t, bool) or not isinstance(t, (int, float)) or not 0 < t < math.inf):
            raise RoutingError(f"temperature: expected a finite number > 0 or None (equal weights), found {t!r}")
        if self.pool not in ("max", "mean"):
            raise RoutingError(f"pool: expected 'max' or 'mean', found {self.pool!r}")
        if self.no_access not in ("error", "base"):
            raise RoutingError(f"no_access: expected 'error' or 'base', found {self.no_access!r}")
        if self.embed is not None and not callable(self.embed):
            raise RoutingError(f"embed: expected a function texts -> (N, d), found {type(self.embed).__name__}")

    @classmethod
    def from_library(cls, lib, refs: Sequence[str] | None, model: nn.Module | None = None, *,
                     groups: Iterable[str], embed: Embed | None = None, tokenizer=None,
                     examples: Mapping[str, Sequence[str]] | None = None, **options) -> "Retrieval":
        """Route over library entries ``refs`` (None: the newest version of every name), keyed by
        each entry's description plus ``examples[name]``, access from each entry's groups.

        ``embed`` defaults to :func:`base_embedder` of ``model`` and ``tokenizer``. With a
        ``model``, the entries the caller may access are attached (inactive, under their
        names) unless already attached; the others never are. ``options``: ``top_k``,
        ``temperature``, ``pool``, ``no_access``.
        """
        entries = _entries(lib, refs)
        if embed is None:
            if model is None or tokenizer is None:
                raise RoutingError("retrieval needs embed= or a model and its tokenizer (the default embedder)")
            embed = base_embedder(model, tokenizer)
        texts = [_texts(e, (examples or {}).get(e.name, ())) for e in entries]
        flat = embed([t for ts in texts for t in ts])
        keys = list(torch.split(_check_embedding(flat, sum(map(len, texts))), [len(ts) for ts in texts]))
        router = cls(names=tuple(e.name for e in entries), keys=keys, access=[e.groups for e in entries],
                     groups=groups, embed=embed, **options)
        if model is not None:
            attached = adapters(model)
            for i in router.candidates:
                if entries[i].name not in attached:
                    lib.load(model, entries[i].ref, name=entries[i].name, activate=False, trainable=False)
        return router

    def describe(self) -> str:
        mix = "equal weights" if self.temperature is None else f"softmax temperature {self.temperature:g}"
        return (f"retrieval: {len(self.candidates)} of {len(self.names)} adapters accessible to groups "
                f"{sorted(self.groups)}, pool={self.pool}, top_k={self.top_k}, {mix}")

    def scores(self, texts: Sequence[str]) -> Tensor:
        """Cosine similarity ``(B, K)`` of each text to each accessible adapter; -inf elsewhere."""
        if isinstance(texts, str) or not isinstance(texts, Sequence) or not texts or \
                not all(isinstance(t, str) for t in texts):
            raise RoutingError(f"retrieval routes by text: expected a non-empty list of strings, found {texts!r:.80}")
        if self.embed is None:
            raise RoutingError("retrieval has no embed function: build it with embed= "
                               "(or from_library(model=, tokenizer=))")
        q = _unit(_check_embedding(self.embed(list(texts)), len(texts), self.keys[0].shape[1]))  # (B, d)
        out = q.new_full((len(texts), len(self.names)), -math.inf)
        for i in self.candidates:
            k = self.keys[i]  # (n_i, d), unit rows
            out[:, i] = (q @ k.T).amax(-1) if self.pool == "max" else q @ _unit(k.mean(0))
        return out

    def route_texts(self, texts: Sequence[str]) -> Tensor:
        """Weights ``(B, K)`` over :attr:`names`: the top_k accessible adapters per row, 0 for
        every other (exactly 0 for every adapter the caller may not access)."""
        if not self.candidates and self.no_access == "error":
            raise RoutingError(f"no adapter is accessible to groups {sorted(self.groups)} "
                               f"(adapters need one of {sorted(set().union(*self.access))})")
        s = self.scores(texts)
        if not self.candidates:
            return torch.zeros_like(s)
        top, idx = s.topk(min(self.top_k, len(self.candidates)), dim=-1)
        if self.temperature is None:
            mix = torch.full_like(top, 1 / top.shape[-1])
        else:
            mix = torch.softmax(top / self.temperature, dim=-1)
        return torch.zeros_like(s).scatter(-1, idx, mix)

    def weights_for(self, model: nn.Module, batch: Mapping[str, Any]) -> Tensor:
        """``route_texts(batch["texts"])``."""
        if not isinstance(batch, Mapping) or "texts" not in batch:
            raise RoutingError("retrieval routes by text: the batch needs 'texts' (one string per row)")
        ids = batch.get("input_ids")
        texts = batch["texts"]
        if isinstance(ids, Tensor) and ids.dim() > 0 and isinstance(texts, Sequence) and len(texts) != ids.shape[0]:
            raise RoutingError(f"retrieval: {len(texts)} texts for a batch of {ids.shape[0]} rows (one text per row)")
        return self.route_texts(texts)

    @contextlib.contextmanager
    def scope(self, model: nn.Module, batch: Mapping[str, Any]) -> Iterator[None]:
        """Within the block, row b of ``model``'s forwards mixes its retrieved adapters; only
        accessible adapters that some row uses are named in the routed forward (the others need
        not be attached, and never run)."""
        names, w = self._used(self.weights_for(model, batch))
        if not names:  # no_access="base", asked for explicitly
            with disabled(model):
                yield
            return
        with routed(model, names, w):
            yield

    def route(self, texts: Sequence[str]) -> tuple[tuple[str, ...], Tensor]:
        """``(names, weights (B, K'))`` for :func:`deltakit.routed` or ``generate(routing=...)``:
        only the accessible adapters some row uses (all others contribute nothing), and the
        choice recorded in :attr:`decisions`. ``names == ()`` (only with ``no_access="base"``)
        means: run these rows on the base model (``deltakit.disabled``)."""
        return self._used(self.route_texts(texts))

    def _used(self, w: Tensor) -> tuple[tuple[str, ...], Tensor]:
        self.record(w)
        # adapters no row uses are left out of the forward (they would add exact zeros at a cost)
        cols = [i for i in self.candidates if bool(w[:, i].any())]
        return tuple(self.names[i] for i in cols), w[:, cols]


def _check_embedding(e: Any, n: int, d: int | None = None) -> Tensor:
    if not isinstance(e, Tensor) or e.dim() != 2 or e.shape[0] != n or (d is not None and e.shape[1] != d):
        found = tuple(e.shape) if isinstance(e, Tensor) else type(e).__name__
        width = d if d is not None else "d"
        raise RoutingError(f"embed: expected a tensor ({n}, {width}) for {n} texts, found {found}")
    return e.float()


def _entries(lib, refs: Sequence[str] | None) -> list:
    """The entries named (a removed one raises the library's error), or the newest version of
    every name in the library."""
    if refs is not None:
        entries = [lib.get(r) for r in refs]
    else:
        newest = {}
        for e in lib.list():
            if e.name not in newest or e.version > newest[e.name].version:
                newest[e.name] = e
        entries = list(newest.values())
    names = [e.name for e in entries]
    if not entries or len(set(names)) != len(names):
        raise RoutingError(f"retrieval needs library entries with distinct names, found {names}")
    return entries


def _texts(entry, examples: Sequence[str]) -> list[str]:
    if isinstance(examples, str):
        raise RoutingError(f"examples for {entry.name!r}: expected a list of texts, found a string")
    texts = ([entry.description] if entry.description else []) + list(examples)
    if not texts:
        raise RoutingError(f"entry {entry.ref} has no description and no examples to retrieve it by")
    return texts
