"""Prompt tuning (Lester et al. 2021, https://arxiv.org/abs/2104.08691).

    inputs_embeds' = [P ; E(x)],   P: (n, d) trainable soft prompt, E the frozen embedding

How it attaches: the delta wraps the model's *backbone* (``bert``, ``transformer``,
``model``: the module that owns the input embeddings and the attention mask logic).
Its forward looks up ``E(input_ids)``, prepends ``P`` and calls the backbone with
``inputs_embeds`` and every per-token input widened by ``n`` positions
(``attention_mask`` with ones, ``token_type_ids`` with zeros, ``position_ids``
shifted by ``n``). Position embeddings (BERT, GPT-2) and rotary positions (Llama)
then cover the prompt as in the paper.

What comes back: the backbone's hidden states with the ``n`` virtual positions
removed, so logits, losses (``labels`` need no padding) and hidden states have the
base model's shapes. peft keeps the virtual positions in causal-LM logits; we strip
them because nothing is predicted there, a loss over them is always masked, and
equal shapes let one batch mix adapters row by row and let downstream code (heads,
metrics, generation) stay unchanged. Pooled outputs that read position 0 (BERT's
pooler) read the first virtual token, as in peft. ``attentions`` are returned over
all ``n + T`` positions.

Mixed batches: a row of adapter k is ``[P_k, E(x), pad]`` and a base row is
``[E(x), pad]``; the trailing pad is masked out, so every row computes exactly what
it computes alone, in one pass.

Generation with a KV cache: the prompt enters the cache on the first step; later
steps (cache not empty) rebuild the prefill's layout in the attention mask (per row its
prompt columns, its input, then the padding that evened out shorter prompts) and shift
positions by the row's prompt length, so left-padded prompts of different lengths, base
rows and rows of other prompt lengths decode in one batch as each would alone. The prefill
width is remembered per cache object (weakly), as the mask alone cannot tell it apart from
the number of steps since.

Initialisation: ``vocab`` copies the embeddings of ``n`` token ids sampled (seeded)
from the first ``vocab_sample`` ids (the paper samples from the 5,000 most common
tokens; BPE / SentencePiece ids are roughly frequency ordered), ``random`` draws
U(-init_range, init_range) (the paper's random init, range 0.5).

>>> import deltakit as dk
>>> from transformers import GPT2Config, GPT2LMHeadModel
>>> m = GPT2LMHeadModel(GPT2Config(vocab_size=50, n_embd=8, n_layer=1, n_head=2, n_positions=16,
...                                  bos_token_id=0, eos_token_id=1))
>>> ad = dk.attach(m, dk.get_method("prompt_tuning").config(num_virtual_tokens=3))
>>> ad.num_parameters()   # n * d
24
>>> m(__import__("torch").tensor([[1, 2, 3]])).logits.shape   # the base's shape
torch.Size([1, 3, 50])
"""
from __future__ import annotations

import functools
import inspect
import weakref
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, ClassVar, Literal

import torch
from torch import Tensor, nn

from ..core.delta import ActivationDelta, BuildContext, param_dtype
from ..core.layer import DeltaStateError
from ..core.fields import knob
from ..core.registry import ConfigError, DeltaConfig, register_method
from ..core.seeding import generator

__all__ = ["PromptTuningConfig", "PromptTuning", "BACKBONES"]

# The module that owns the input embeddings and builds the attention mask.
BACKBONES: dict[str, tuple[str, ...]] = {
    "bert": ("re:bert",), "roberta": ("re:roberta",), "xlm-roberta": ("re:roberta",),
    "electra": ("re:electra",), "gpt2": ("re:transformer",), "llama": ("re:model",),
    "mistral": ("re:model",), "qwen2": ("re:model",), "qwen3": ("re:model",), "gemma": ("re:model",),
}


@dataclass(frozen=True)
class PromptTuningConfig(DeltaConfig):
    """Prompt tuning hyper-parameters."""

    num_virtual_tokens: int = knob(20, ge=1, doc="n, the soft prompt length")
    init: Literal["vocab", "random"] = knob(
        "vocab", doc="``vocab`` (embeddings of sampled token ids) or ``random`` (uniform)")
    vocab_sample: int = knob(5000, ge=1, doc="``vocab`` init samples ids from the first ``vocab_sample`` tokens")
    init_range: float = knob(0.5, ge=0, doc="``random`` init draws from U(-init_range, init_range)")
    seed: int = knob(0, doc="seed of the init sampling (reproducible prompts)")


def _is_backbone(base: nn.Module) -> bool:
    return callable(getattr(base, "get_input_embeddings", None))


class PromptedBackbone(ActivationDelta):
    """Base of deltas that prepend virtual tokens to a backbone's input (prompt tuning,
    DePT). Subclasses set ``self.n`` and implement :meth:`prompt` and optionally
    :meth:`token_update`."""

    n: int = 0

    @classmethod
    def supports(cls, base: nn.Module) -> bool:
        return _is_backbone(base)

    def _bind(self, base: nn.Module) -> None:
        # Plain reference (not a submodule): the frozen backbone is not the adapter's.
        object.__setattr__(self, "_backbone", base)

    def prompt(self) -> Tensor:
        """The virtual tokens, (n, d)."""
        raise NotImplementedError

    def token_update(self, T: int) -> Tensor | None:
        """Per-position offset added to the input token embeddings, (T, d), or None."""
        return None

    def forward(self, inner, x, *args, **kwargs):
        lead = x if isinstance(x, Tensor) else kwargs.get("inputs_embeds")
        row = torch.zeros(lead.shape[0], dtype=torch.long, device=lead.device)
        return _prompted(self._backbone, inner, [self], row, x, args, kwargs)

    @classmethod
    def mixed_forward(cls, base: nn.Module, deltas: Sequence["PromptedBackbone"], row: Tensor, x, *args, **kwargs):
        return _prompted(base, base, deltas, row, x, args, kwargs)


@functools.lru_cache(maxsize=None)
def _signature(cls: type) -> tuple[inspect.Signature, str, str | None]:
    """(signature without ``self``, first parameter, ``**kwargs`` name) of ``cls.forward``;
    cached per class because it is read on every forward."""
    sig = inspect.signature(cls.forward)
    params = list(sig.parameters.values())[1:]
    var_kw = next((p.name for p in params if p.kind is p.VAR_KEYWORD), None)
    return sig.replace(parameters=params), params[0].name, var_kw


def _arguments(base: nn.Module, x, args, kwargs) -> tuple[str, dict[str, Any]]:
    """A module call as one ``name -> value`` dict: (first parameter name, dict)."""
    sig, first, var_kw = _signature(type(base))
    call = dict(sig.bind_partial(x, *args, **kwargs).arguments)
    if var_kw in call:
        call.update(call.pop(var_kw))
    return first, call


def cache_key(module: nn.Module, call: Mapping[str, Any]) -> str:
    """The keyword under which ``module`` takes its KV cache: ``cache`` from transformers
    5.24 on, ``past_key_values`` before (a call may carry either)."""
    for key in ("cache", "past_key_values"):
        if key in call:
            return key
    return "cache" if "cache" in _signature(type(module))[0].parameters else "past_key_values"


def _prompted(base: nn.Module, inner, deltas: Sequence[PromptedBackbone], row: Tensor, x, args, kwargs):
    first, call = _arguments(base, x, args, kwargs)
    input_ids = call.pop(first, None)
    past = call.get(cache_key(base, call))
    if past is not None and hasattr(past, "get_seq_length") and past.get_seq_length() > 0:
        return _cached_step(inner, deltas, row, input_ids, call, past)
    embeds = call.pop("inputs_embeds", None)
    if embeds is None:
        embeds = base.get_input_embeddings()(input_ids)                         # (B, T, d)
    T = embeds.shape[1]
    rows = _RowGroups(deltas, row, embeds.device)
    call["inputs_embeds"] = rows.widen(_add_updates(embeds, deltas, row, T), rows.prompts, 0.0)
    _widen_inputs(call, rows, embeds)
    out = inner(None, **call)
    _remember_layout(out, rows.lens, T)
    index = (rows.lens.view(-1, 1) + torch.arange(T, device=embeds.device)).long()  # (B, T) real positions
    return _strip(out, index, rows.n_max, T)


# cache object -> (prompt length per row (B,), prefill width T): what a later step needs to
# rebuild the prefill's layout. Weak keys: an entry lives as long as its cache.
_LAYOUTS: "weakref.WeakKeyDictionary[Any, tuple[Tensor, int]]" = weakref.WeakKeyDictionary()


def _remember_layout(out, lens: Tensor, T: int) -> None:
    cache = getattr(out, "past_key_values", None) or getattr(out, "cache", None)
    if cache is not None and hasattr(cache, "get_seq_length"):
        _LAYOUTS[cache] = (lens, T)


def _cached_step(inner, deltas: Sequence[PromptedBackbone], row: Tensor, input_ids, call: dict, past):
    """Later generation steps: the prompts are already in the cache as the prefill laid them
    out, ``[P_b ; x_b ; n_max - n_b pads]`` per row; rebuild that layout in the mask (the
    caller's mask covers only the real columns) and shift positions by each row's n_b."""
    lens = torch.tensor([d.n for d in deltas] + [0], device=row.device)[row]              # (B,)
    m = call.get("attention_mask")
    if m is None:  # every column real: the caller's implicit mask, past prefill columns + this step's
        q = (input_ids if input_ids is not None else call["inputs_embeds"]).shape[1]
        width = int(past.get_seq_length()) - int(lens.max()) + q
        m = torch.ones(lens.shape[0], width, dtype=torch.long, device=lens.device)
    if int(lens.min()) == int(lens.max()):   # one prompt length, no padding after the input
        call["attention_mask"] = torch.cat([m.new_ones(m.shape[0], int(lens[0])), m], dim=1)
    else:
        layout = _LAYOUTS.get(past)
        if layout is None or not torch.equal(layout[0].to(lens.device), lens):
            raise DeltaStateError("prompt tuning with a KV cache: expected the cache of a prefill with the same "
                                  "rows and adapters, found " + ("an unknown cache" if layout is None else "other rows"))
        call["attention_mask"] = _prefill_layout(m, lens, layout[1])
    if call.get("position_ids") is not None:
        call["position_ids"] = call["position_ids"] + lens.view(-1, 1).to(call["position_ids"].dtype)
    return inner(input_ids, **call)


def _prefill_layout(mask: Tensor, lens: Tensor, T: int) -> Tensor:
    """(B, T + s) mask of the real columns -> (B, n_max + T + s): per row ``n_b`` ones (its
    prompt), the first T columns, ``n_max - n_b`` zeros (the prefill's padding), the rest."""
    n_max = int(lens.max())
    j = torch.arange(n_max + T, device=mask.device)[None, :]                    # prefill columns
    n = lens.view(-1, 1).to(mask.device)
    real = mask[:, :T].gather(1, (j - n).clamp(0, T - 1))
    head = torch.where(j < n, torch.ones_like(real), torch.where(j < n + T, real, torch.zeros_like(real)))
    return torch.cat([head, mask[:, T:]], dim=1)


def _add_updates(embeds: Tensor, deltas: Sequence[PromptedBackbone], row: Tensor, T: int) -> Tensor:
    """Each row's adapter's per-token update of the real tokens' embeddings (DePT), if any."""
    out = embeds
    for k, d in enumerate(deltas):
        upd = d.token_update(T)
        if upd is not None:
            keep = (row == k).view(-1, 1, 1)
            out = torch.where(keep, out + upd.to(out.dtype), out)
    return out


class _RowGroups:
    """The batch's rows grouped by adapter (-1: the base): each group is widened to
    ``n_max + T`` as ``[its prompt ; the input ; padding]``, then row order is restored."""

    def __init__(self, deltas: Sequence[PromptedBackbone], row: Tensor, device):
        self.deltas = deltas
        self.lens = torch.tensor([d.n for d in deltas] + [0], device=device)[row]  # (B,) n_b (0 for base)
        self.n_max = int(self.lens.max())
        self.groups = [(k, sel) for k in [-1, *range(len(deltas))]
                       if (sel := (row == k).nonzero(as_tuple=True)[0]).numel()]
        self.inv = torch.argsort(torch.cat([sel for _, sel in self.groups]))

    def widen(self, t: Tensor | None, left, pad_value) -> Tensor | None:
        """(B, T, ...) -> (B, n_max + T, ...): per group [left(k, rows) ; t ; pad]."""
        if t is None:
            return None
        parts = []
        for k, sel in self.groups:
            nk = self.deltas[k].n if k >= 0 else 0
            sub = t.index_select(0, sel)
            pieces = [left(k, sub)] if nk else []
            pieces.append(sub)
            if self.n_max - nk:
                pieces.append(sub.new_full((sub.shape[0], self.n_max - nk, *sub.shape[2:]), pad_value))
            parts.append(torch.cat(pieces, dim=1))
        return torch.cat(parts, dim=0).index_select(0, self.inv)

    def prompts(self, k: int, sub: Tensor) -> Tensor:
        return self.deltas[k].prompt().to(sub.dtype).unsqueeze(0).expand(sub.shape[0], -1, -1)


def _widen_inputs(call: dict, rows: _RowGroups, embeds: Tensor) -> None:
    """Attention mask, token types and positions widened to match the prompted embeddings."""
    B, T = embeds.shape[:2]
    n = lambda k: rows.deltas[k].n  # noqa: E731
    mask = call.get("attention_mask")
    if mask is not None or int(rows.lens.min()) != rows.n_max:
        mask = torch.ones(B, T, dtype=torch.long, device=embeds.device) if mask is None else mask
        call["attention_mask"] = rows.widen(mask, lambda k, s: s.new_ones(s.shape[0], n(k)), 0)
    if call.get("token_type_ids") is not None:
        call["token_type_ids"] = rows.widen(call["token_type_ids"], lambda k, s: s.new_zeros(s.shape[0], n(k)), 0)
    if call.get("position_ids") is not None:
        pos = call["position_ids"]
        if pos.shape[0] != B:
            pos = pos.expand(B, -1)
        # prompt rows: virtual tokens at 0..n-1, real tokens shifted by n
        shifted = pos + rows.lens.view(-1, 1)
        call["position_ids"] = rows.widen(shifted, lambda k, s: torch.arange(n(k), device=s.device)
                                          .expand(s.shape[0], -1).to(s.dtype), 0)


def _strip(out, index: Tensor, n_max: int, T: int):
    def take(h):
        if not isinstance(h, Tensor) or h.dim() < 3 or h.shape[1] != n_max + T:
            return h
        return torch.gather(h, 1, index.view(*index.shape, *([1] * (h.dim() - 2))).expand(-1, -1, *h.shape[2:]))

    if isinstance(out, tuple):
        return (take(out[0]), *out[1:])
    if getattr(out, "last_hidden_state", None) is not None:
        out.last_hidden_state = take(out.last_hidden_state)
    if getattr(out, "hidden_states", None) is not None:
        out.hidden_states = tuple(take(h) for h in out.hidden_states)
    return out


@register_method("prompt_tuning", PromptTuningConfig, paper="https://arxiv.org/abs/2104.08691",
                 description="n trainable soft-prompt vectors prepended to the input embeddings")
class PromptTuning(PromptedBackbone):
    supported: ClassVar[tuple[type, ...]] = ()
    default_targets = BACKBONES

    def __init__(self, base: nn.Module, config: PromptTuningConfig, ctx: BuildContext | None = None):
        super().__init__()
        if not _is_backbone(base):
            raise ConfigError(f"prompt tuning targets a transformers backbone (with get_input_embeddings), "
                              f"found {type(base).__name__}")
        self._bind(base)
        emb = base.get_input_embeddings()
        self.n = config.num_virtual_tokens
        dtype = param_dtype(base, config.adapter_dtype)
        self.prompt_embeddings = nn.Parameter(init_prompt(emb.weight, self.n, config).to(dtype))   # (n, d)

    def prompt(self) -> Tensor:
        return self.prompt_embeddings

    @classmethod
    def contract_config(cls, kind: str) -> DeltaConfig | None:
        return None if kind == "conv" else PromptTuningConfig(num_virtual_tokens=3)


@torch.no_grad()
def init_prompt(weight: Tensor, n: int, config: PromptTuningConfig) -> Tensor:
    """Initial soft prompt (n, d) from the (V, d) embedding matrix."""
    V, d = weight.shape
    g = generator(config.seed, scheme="raw")
    if config.init == "vocab":
        ids = torch.randint(0, min(config.vocab_sample, V), (n,), generator=g)
        return weight.detach()[ids.to(weight.device)].clone()
    return ((torch.rand(n, d, generator=g) * 2 - 1) * config.init_range).to(weight.device, weight.dtype)
