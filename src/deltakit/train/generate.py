"""Text generation through attached adapters: batched greedy or sampled decoding with a KV cache.

Each row may use its own adapter for the whole decode (``adapters=["a", "b", None]``: None is
the base); the rows run in one forward per step through :func:`deltakit.mixed_batch`, and every
row's tokens equal what that adapter alone produces (tested token for token, and against the
merged adapter).

Why a small decode loop of our own rather than ``transformers``' ``model.generate`` under
``mixed_batch`` (which also works: LoRA, prompt and prefix tuning give the same greedy tokens
with left padding and the cache, checked in tests/train/test_generate.py):

* seeded sampling must not touch the global RNG (core/seeding.py: threads and a caller's own
  seeding must not change the numbers). ``model.generate`` samples with ``torch.multinomial``
  on the global generator, so seeding it means ``fork_rng`` around the whole call, which is
  process-wide and races between server threads. Here each prompt has its own
  ``torch.Generator`` seeded from ``(seed, prompt index)``, so a prompt's sample does not
  depend on ``batch_size`` or on which prompts share its batch;
* the loop is the contract the methods rely on, in one place: left padding, positions from
  the attention mask (cumsum - 1, as ``generate`` does), one cache object handed back each step
  (prompt tuning and prefix tuning read it to tell the prefill from later steps);
* less work per step (no logits-processor / stopping-criteria machinery), which matters when
  unmerged and merged decoding are compared.

What it does not offer: beam search, repetition penalties, stop strings. For those, call
``model.generate`` inside ``with dk.mixed_batch(model, rows):`` yourself.

>>> import deltakit as dk
>>> from transformers import GPT2Config, GPT2LMHeadModel
>>> m = GPT2LMHeadModel(GPT2Config(vocab_size=50, n_embd=8, n_layer=1, n_head=2, n_positions=32)).eval()
>>> out = generate_ids(m, [[5, 6, 7], [8]], max_new_tokens=4, pad_token_id=0, eos_token_id=None)
>>> [len(o) for o in out]
[4, 4]
"""
from __future__ import annotations

import contextlib
import functools
import inspect
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from ..core.adapter import adapters as attached
from ..core.adapter import disabled, mixed_batch, model_state, routed
from ..core.seeding import generator
from .instruct import _render, to_messages

__all__ = ["generate", "generate_ids", "encode_prompts", "Decoding", "eos_ids"]

Prompt = str | Sequence[Mapping[str, str]]


@dataclass(frozen=True)
class Decoding:
    """How to pick tokens. ``temperature`` and ``top_p`` apply only with ``do_sample``;
    ``top_p`` keeps the smallest set of most likely tokens whose probability reaches it."""

    max_new_tokens: int = 64
    do_sample: bool = False
    temperature: float = 1.0
    top_p: float = 1.0
    seed: int = 0
    pad_token_id: int = 0
    eos_token_id: int | Sequence[int] | None = ()

    def __post_init__(self) -> None:
        eos = self.eos_token_id
        object.__setattr__(self, "eos_token_id", () if eos is None else (eos,) if isinstance(eos, int) else tuple(eos))
        if self.max_new_tokens < 1:
            raise ValueError(f"expected max_new_tokens >= 1, found {self.max_new_tokens}")
        if self.do_sample and not self.temperature > 0:
            raise ValueError(f"expected temperature > 0 for sampling, found {self.temperature}")
        if self.do_sample and not 0 < self.top_p <= 1:
            raise ValueError(f"expected 0 < top_p <= 1, found {self.top_p}")


def generate(model: nn.Module, tokenizer: Any, prompts: Sequence[Prompt] | str, *,
             adapters: str | Sequence[str | None] | None = None, max_new_tokens: int = 64,
             do_sample: bool = False, temperature: float = 1.0, top_p: float = 1.0, seed: int = 0,
             chat: bool = True, batch_size: int = 8,
             routing: tuple[Sequence[str], Tensor] | None = None) -> list[str]:
    """The text each prompt continues with (new tokens only, up to the first end-of-sequence).

    ``prompts``: strings, or (with ``chat``) conversations as lists of ``{"role", "content"}``.
    With ``chat`` a string is one user turn, rendered through the tokenizer's chat template with
    the generation prompt, exactly as :mod:`deltakit.train.instruct` renders training prompts.
    ``adapters``: None runs the model as it is (its active / merged adapters); one name runs
    every row with that adapter; a list names each row's adapter (None = the base).
    ``routing``: ``(names, weights (N, K))``, soft weights over adapters ``names`` per prompt
    (:func:`deltakit.core.adapter.routed`), kept aligned with the prompts through the batching.
    """
    prompts = [prompts] if isinstance(prompts, str) else list(prompts)
    ids = encode_prompts(tokenizer, prompts, chat=chat)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    settings = Decoding(max_new_tokens, do_sample, temperature, top_p, seed, int(pad or 0),
                        eos_ids(model, tokenizer))
    out = generate_ids(model, ids, adapters=adapters, batch_size=batch_size, decoding=settings, routing=routing)
    return [tokenizer.decode(o, skip_special_tokens=True) for o in out]


def encode_prompts(tokenizer: Any, prompts: Sequence[Prompt], *, chat: bool = True) -> list[list[int]]:
    """Token ids of each prompt; with ``chat``, rendered as a conversation awaiting the assistant."""
    out = []
    for i, p in enumerate(prompts):
        if not chat:
            if not isinstance(p, str):
                raise TypeError(f"prompt {i}: expected text (chat=False), found {type(p).__name__}")
            out.append(list(tokenizer(p)["input_ids"]))
            continue
        if isinstance(p, str):
            msgs = [{"role": "user", "content": p}]
        else:
            msgs = to_messages({"messages": [*p, {"role": "assistant", "content": ""}]}, f"prompt {i}")[:-1]
        out.append(_render(tokenizer, msgs, generation_prompt=True))
    if any(not ids for ids in out):
        raise ValueError(f"prompt {next(i for i, x in enumerate(out) if not x)}: expected at least one token, "
                         "found none")
    return out


def eos_ids(model: nn.Module, tokenizer: Any = None) -> tuple[int, ...]:
    """End-of-sequence ids: the model's generation config (an int or a list) and the tokenizer's."""
    ids: list[int] = []
    gen = getattr(model, "generation_config", None)
    for v in (getattr(gen, "eos_token_id", None), getattr(tokenizer, "eos_token_id", None)):
        ids += [v] if isinstance(v, int) else list(v or [])
    return tuple(dict.fromkeys(ids))


def generate_ids(model: nn.Module, prompts: Sequence[Sequence[int]], *,
                 adapters: str | Sequence[str | None] | None = None, batch_size: int = 8,
                 decoding: Decoding | None = None, routing: tuple[Sequence[str], Tensor] | None = None,
                 **settings) -> list[list[int]]:
    """New token ids per prompt (up to, not including, the first EOS), in prompt order.

    Prompts are decoded in batches of ``batch_size`` after sorting by length (less padding), so
    give per-row adapters through ``adapters`` (or per-row soft weights through ``routing``:
    ``(names, (N, K) weights)``), not an enclosing ``mixed_batch`` or per-row ``routed`` (whose
    rows would no longer line up). The model runs in eval mode (adapter dropout off) and its mode
    is restored afterwards. ``settings`` are :class:`Decoding` fields when ``decoding`` is not given.
    """
    d = decoding or Decoding(**settings)
    if batch_size < 1:
        raise ValueError(f"expected batch_size >= 1, found {batch_size}")
    rows = _row_adapters(model, adapters, len(prompts))
    if routing is not None and (rows is not None or len(routing[1]) != len(prompts)):
        raise ValueError(f"routing: expected weights for each of {len(prompts)} prompts and no adapters=, found "
                         f"{len(routing[1])} rows{' and adapters=' if rows is not None else ''}")
    order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))
    out: list[list[int]] = [[] for _ in prompts]
    was_training = model.training
    model.eval()
    try:
        for start in range(0, len(order), batch_size):
            chunk = order[start:start + batch_size]
            scope = (routed(model, routing[0], routing[1][chunk]) if routing is not None
                     else _adapter_scope(model, None if rows is None else [rows[i] for i in chunk]))
            with scope:
                new = _decode(model, [list(prompts[i]) for i in chunk], chunk, d)
            for i, toks in zip(chunk, new):
                out[i] = toks
    finally:
        model.train(was_training)
    return out


def _row_adapters(model: nn.Module, adapters: str | Sequence[str | None] | None,
                  n: int) -> list[str | None] | None:
    if adapters is None:
        return None
    rows = [adapters] * n if isinstance(adapters, str) else list(adapters)
    if len(rows) != n:
        raise ValueError(f"expected one adapter per prompt ({n}), found {len(rows)}")
    known = attached(model)
    missing = sorted({r for r in rows if r is not None and r not in known})
    if missing:
        raise KeyError(f"unknown adapter(s) {missing}; attached: {sorted(known)}")
    return rows


def _adapter_scope(model: nn.Module, rows: list[str | None] | None):
    """The per-call context giving each row its adapter. One adapter that is already the
    model's only live one runs the plain path (same maths, no per-row gather)."""
    if rows is None:
        return contextlib.nullcontext()
    state = model_state(model)
    if all(r is None for r in rows):
        return disabled(model)
    if state is not None and len(set(rows)) == 1 and state.active == (rows[0],) and not state.merged:
        return contextlib.nullcontext()
    return mixed_batch(model, rows)


@torch.no_grad()
def _decode(model: nn.Module, prompts: list[list[int]], index: list[int], d: Decoding) -> list[list[int]]:
    """One batch: prefill the left-padded prompts, then one token per step from the cache."""
    device = next(model.parameters()).device
    ids, mask = _left_pad(prompts, d.pad_token_id, device)
    pos = (mask.cumsum(-1) - 1).clamp(min=0)                       # (B, T): as generate() derives them
    pick = _sampler(d, index) if d.do_sample else _greedy
    eos = torch.tensor(d.eos_token_id, dtype=torch.long, device=device)
    done = torch.zeros(len(prompts), dtype=torch.bool, device=device)
    logits, cache = _forward(model, ids, mask, pos, None)
    new: list[Tensor] = []
    for step in range(d.max_new_tokens):
        tok = torch.where(done, d.pad_token_id, pick(logits))      # (B,)
        new.append(tok)
        done |= torch.isin(tok, eos)
        if bool(done.all()) or step == d.max_new_tokens - 1:
            break
        mask = torch.cat([mask, mask.new_ones(mask.shape[0], 1)], dim=1)
        pos = pos[:, -1:] + 1
        logits, cache = _forward(model, tok[:, None], mask, pos, cache)
    tokens = torch.stack(new, dim=1).tolist()
    return [_until_eos(row, set(d.eos_token_id)) for row in tokens]


def _left_pad(prompts: list[list[int]], pad: int, device) -> tuple[Tensor, Tensor]:
    """(ids, attention mask), each (B, T), padded on the left so every row's last token lines up."""
    width = max(len(p) for p in prompts)
    ids = torch.tensor([[pad] * (width - len(p)) + p for p in prompts], device=device)
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts], device=device)
    return ids, mask


def _forward(model: nn.Module, ids: Tensor, mask: Tensor, pos: Tensor, cache) -> tuple[Tensor, Any]:
    """Last-position logits (B, V) and the cache to pass on."""
    names = _forward_params(type(model))
    kw: dict[str, Any] = {"attention_mask": mask, "use_cache": True}
    if "position_ids" in names:
        kw["position_ids"] = pos
    if "logits_to_keep" in names:
        kw["logits_to_keep"] = 1  # the prefill needs the last position's logits only
    if cache is not None:
        kw["cache" if "cache" in names else "past_key_values"] = cache
    out = model(input_ids=ids, **kw)
    cache = getattr(out, "cache", None) or getattr(out, "past_key_values", None)
    if cache is None:
        raise TypeError(f"{type(model).__name__} returned no KV cache; expected a transformers causal LM")
    return out.logits[:, -1], cache


@functools.lru_cache(maxsize=None)
def _forward_params(cls: type) -> frozenset[str]:
    return frozenset(inspect.signature(cls.forward).parameters)


def _greedy(logits: Tensor) -> Tensor:
    return logits.argmax(-1)


def _sampler(d: Decoding, index: list[int]):
    """Draws row b's token from its own generator, seeded from ``(seed, prompt index)``."""
    gens = [generator(d.seed, "generate", i) for i in index]

    def pick(logits: Tensor) -> Tensor:
        u = torch.stack([torch.rand((), generator=g, dtype=torch.float64) for g in gens]).to(logits.device)
        return sample_top_p(logits, u, d.temperature, d.top_p)
    return pick


def sample_top_p(logits: Tensor, u: Tensor, temperature: float, top_p: float) -> Tensor:
    """Inverse-CDF draw with uniforms ``u`` (B,) in [0, 1) from ``softmax(logits / temperature)``
    restricted to the nucleus: the most likely tokens until their mass reaches ``top_p``
    (the token that crosses it included, as in Holtzman et al. 2019 and transformers)."""
    probs = (logits.double() / temperature).softmax(-1)                 # (B, V)
    sp, si = probs.sort(-1, descending=True)
    sp = sp.masked_fill(sp.cumsum(-1) - sp >= top_p, 0.0)               # mass before it already reached top_p
    cum = sp.cumsum(-1)
    k = torch.searchsorted(cum, (u * cum[:, -1])[:, None], right=True).clamp(max=sp.shape[-1] - 1)
    return si.gather(1, k).squeeze(1)


def _until_eos(tokens: list[int], eos: set[int]) -> list[int]:
    for j, t in enumerate(tokens):
        if t in eos:
            return tokens[:j]
    return tokens
