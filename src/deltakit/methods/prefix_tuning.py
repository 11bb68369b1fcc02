"""Prefix tuning (Li & Liang 2021, https://arxiv.org/abs/2101.00190).

    head_i = Attn(x W_q, [P_k ; x W_k], [P_v ; x W_v]),   P_k, P_v: (n, d_kv) per layer

Every attention layer attends to n extra key/value rows of its own. With
``reparam`` (the paper's training-time reparametrisation) the prefixes of all
layers come from one small shared network, ``P = MLP(P')`` with P': (n, d_kv) and
MLP d_kv -> ``reparam_hidden`` -> L * 2 * d_kv (tanh); :func:`fold_prefix` computes
the per-layer prefixes once and drops the network, so the stored adapter holds only
2 L n d_kv numbers (the paper keeps only P after training too).

How it attaches: a delta wraps each self-attention module (``attention.self`` /
``attn`` / ``self_attn``) and hands it a tiny KV-cache object whose ``update``
prepends the prefix to the keys and values the module computes (after RoPE on
Llama: prefix keys carry no rotation, as in the official code and peft, which feed
them as a cache), and an attention mask widened by n always-visible columns (the
causal mask is built explicitly when the model left it implicit). A real cache
passed by the model keeps working (the prefix never enters it), so generation with
a cache is unchanged. Works with the ``sdpa`` and ``eager`` attention
implementations.

Positions: in the paper the prefix occupies positions 0..n-1 of the sequence
[PREFIX; x], so real tokens sit at n..n+T-1 (the official code and peft get this
by passing the prefix as ``past_key_values``). A parameter-free delta on the
backbone (``bert`` / ``transformer`` / ``model``) shifts ``position_ids`` by n; leave
the backbone out of ``targets`` to keep positions 0..T-1. With the shift, outputs
equal peft's ``PrefixTuningConfig`` at equal prefixes (tested).

Mixed batches: rows of adapters with shorter prefixes (and base rows: length 0) see
their unused prefix columns masked out, so one pass serves every row exactly.

Initialisation: prefixes ~ N(0, 1) (peft's; the paper's init from real-word
activations is not implemented).

>>> import deltakit as dk
>>> from transformers import GPT2Config, GPT2LMHeadModel
>>> m = GPT2LMHeadModel(GPT2Config(vocab_size=50, n_embd=8, n_layer=2, n_head=2, n_positions=16,
...                                bos_token_id=0, eos_token_id=1))
>>> ad = dk.attach(m, dk.get_method("prefix_tuning").config(num_virtual_tokens=3))
>>> ad.num_parameters()   # 2 * L * n * d = 2 * 2 * 3 * 8
96
"""
from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import Tensor, nn

from ..core.adapter import Adapter
from ..core.delta import ActivationDelta, BuildContext, param_dtype
from ..core.fields import knob
from ..core.registry import ConfigError, DeltaConfig, register_method
from .prompt_tuning import BACKBONES, _arguments, _is_backbone, cache_key

__all__ = ["PrefixTuningConfig", "PrefixTuning", "fold_prefix", "ATTENTION", "DEFAULT_TARGETS",
           "prefixed_attention", "shifted_positions"]

ATTENTION: dict[str, tuple[str, ...]] = {
    "bert": ("attention.self",), "roberta": ("attention.self",), "gpt2": ("attn",),
    "llama": ("self_attn",), "mistral": ("self_attn",), "qwen2": ("self_attn",), "qwen3": ("self_attn",),
}
#: attention modules plus the backbone (which shifts positions by n)
DEFAULT_TARGETS: dict[str, tuple[str, ...]] = {k: BACKBONES[k] + v for k, v in ATTENTION.items()}


@dataclass(frozen=True)
class PrefixTuningConfig(DeltaConfig):
    """Prefix tuning hyper-parameters."""

    num_virtual_tokens: int = knob(20, ge=1, doc="n, the prefix length in every layer")
    reparam: bool = knob(False, doc="produce the prefixes with the shared MLP (training); see :func:`fold_prefix`")
    reparam_hidden: int = knob(512, ge=1, log=True, doc="hidden width of that MLP")
    init_std: float = knob(1.0, ge=0, doc="std of the initial prefixes (or of P' under ``reparam``)")


def kv_layout(attn: nn.Module) -> tuple[int, int]:
    """(number of key/value heads, head dim) of a transformers attention module."""
    cfg = getattr(attn, "config", None)
    hd = getattr(attn, "head_dim", None) or getattr(attn, "attention_head_size", None)
    heads = (getattr(cfg, "num_key_value_heads", None) or getattr(attn, "num_heads", None)
             or getattr(attn, "num_attention_heads", None) or getattr(cfg, "num_attention_heads", None))
    if not hd or not heads:
        raise ConfigError(f"prefix tuning: expected an attention module with head_dim / heads, "
                          f"found {type(attn).__name__}")
    return int(heads), int(hd)


class _Reparam(nn.Module):
    """P' (n, d_kv) -> MLP -> (n, L, 2, d_kv): every layer's prefixes."""

    def __init__(self, n: int, d_kv: int, hidden: int, slots: dict[str, int], std: float, dtype, device):
        super().__init__()
        kw = dict(dtype=dtype, device=device)
        L = len(slots)
        self.L, self.d_kv = L, d_kv
        self.slots = slots  # attention module path -> its layer slot in the MLP output
        self.prefix_input = nn.Parameter(torch.randn(n, d_kv, **kw) * std)
        self.mlp = nn.Sequential(nn.Linear(d_kv, hidden, **kw), nn.Tanh(), nn.Linear(hidden, L * 2 * d_kv, **kw))

    def forward(self) -> Tensor:
        return self.mlp(self.prefix_input).view(-1, self.L, 2, self.d_kv)


class _PrefixCache:
    """Stands in for the model's cache inside one attention call: ``update`` prepends
    the per-row prefixes to what the real cache (if any) returns."""

    def __init__(self, real: Any, keys: Tensor, values: Tensor):
        self.real = getattr(real, "self_attention_cache", real)  # EncoderDecoderCache -> self-attn part
        self.keys, self.values = keys, values                       # (B, H_kv, n_max, hd)

    def past_length(self, layer_idx: int | None) -> int:
        if self.real is None or not hasattr(self.real, "get_seq_length"):
            return 0
        return int(self.real.get_seq_length(layer_idx or 0))

    def update(self, key: Tensor, value: Tensor, layer_idx: int | None = None, *args, **kwargs):
        if self.real is not None:
            key, value = self.real.update(key, value, layer_idx, *args, **kwargs)
        return (torch.cat([self.keys.to(key.dtype), key], dim=2),
                torch.cat([self.values.to(value.dtype), value], dim=2))


@register_method("prefix_tuning", PrefixTuningConfig, paper="https://arxiv.org/abs/2101.00190",
                 description="trainable key/value prefixes in every attention layer")
class PrefixTuning(ActivationDelta):
    supported: ClassVar[tuple[type, ...]] = ()
    default_targets = DEFAULT_TARGETS

    def __init__(self, base: nn.Module, config: PrefixTuningConfig, ctx: BuildContext | None = None):
        super().__init__()
        self.n = config.num_virtual_tokens
        # plain reference to the frozen module (its signature, layer_idx, is_causal)
        object.__setattr__(self, "_attn", base)
        self.role = "backbone" if _is_backbone(base) else "attention"
        if self.role == "backbone":
            return  # no parameters: only shifts positions by n
        self.heads, self.head_dim = kv_layout(base)
        self.slot = ctx.shared.slots[ctx.name] if config.reparam and ctx is not None and ctx.shared else 0
        if config.reparam:
            if ctx is None or ctx.shared is None:
                raise ConfigError("prefix tuning with reparam needs the adapter's shared MLP (use dk.attach)")
            object.__setattr__(self, "_shared", ctx.shared)
        else:
            d_kv = self.heads * self.head_dim
            kw = dict(dtype=param_dtype(base, config.adapter_dtype), device=next(base.parameters()).device)
            self.prefix_key = nn.Parameter(torch.randn(self.n, d_kv, **kw) * config.init_std)    # (n, d_kv)
            self.prefix_value = nn.Parameter(torch.randn(self.n, d_kv, **kw) * config.init_std)  # (n, d_kv)

    @classmethod
    def build_shared(cls, config: PrefixTuningConfig, targets: Mapping[str, nn.Module]) -> nn.Module | None:
        if not config.reparam:
            return None
        attn = {p: m for p, m in targets.items() if not _is_backbone(m)}
        layouts = {kv_layout(m) for m in attn.values()}
        if len(layouts) != 1:
            raise ConfigError(f"prefix reparam needs one key/value layout across layers, found {sorted(layouts)}")
        heads, hd = layouts.pop()
        base = next(iter(attn.values()))
        slots = {p: i for i, p in enumerate(attn)}
        return _Reparam(config.num_virtual_tokens, heads * hd, config.reparam_hidden, slots,
                        config.init_std, param_dtype(base, config.adapter_dtype), next(base.parameters()).device)

    def key_value(self) -> tuple[Tensor, Tensor]:
        """This layer's prefixes, each (H_kv, n, hd)."""
        if "prefix_key" in self._parameters:
            k, v = self.prefix_key, self.prefix_value
        else:
            kv = self._shared()[:, self.slot]                    # (n, 2, d_kv)
            k, v = kv[:, 0], kv[:, 1]
        shape = (self.n, self.heads, self.head_dim)
        return k.reshape(shape).transpose(0, 1), v.reshape(shape).transpose(0, 1)

    def forward(self, inner, x, *args, **kwargs):
        lead = x if isinstance(x, Tensor) else kwargs.get("inputs_embeds")
        row = torch.zeros(lead.shape[0], dtype=torch.long, device=lead.device)
        run = shifted_positions if self.role == "backbone" else prefixed_attention
        return run(inner, self._attn, [self], row, x, args, kwargs)

    @classmethod
    def mixed_forward(cls, base: nn.Module, deltas: Sequence["PrefixTuning"], row: Tensor, x, *args, **kwargs):
        run = shifted_positions if deltas[0].role == "backbone" else prefixed_attention
        return run(base, base, deltas, row, x, args, kwargs)

    @classmethod
    def contract_config(cls, kind: str) -> DeltaConfig | None:
        return None if kind == "conv" else PrefixTuningConfig(num_virtual_tokens=3)


def prefixed_attention(inner, module: nn.Module, deltas: Sequence[Any], row: Tensor, x: Tensor, args, kwargs):
    """Run attention ``module`` (through ``inner``) with per-row prefixes.

    row (B,) indexes ``deltas`` (-1 = no prefix); each delta offers ``n``, ``heads``,
    ``head_dim`` and ``key_value() -> (K, V)``, each (H_kv, n, hd), or (B, H_kv, n, hd) when
    the prefixes differ per row (UniPELT scales them by a gate computed from each row).
    """
    first, call = _arguments(module, x, args, kwargs)
    call.pop(first, None)  # the hidden states travel as x
    B, q = x.shape[0], x.shape[1]
    lens = torch.tensor([d.n for d in deltas] + [0], device=x.device)[row]            # (B,)
    n_max = int(lens.max())
    heads, hd = deltas[0].heads, deltas[0].head_dim
    keys = x.new_zeros(B, heads, n_max, hd)
    values = x.new_zeros(B, heads, n_max, hd)
    for k, d in enumerate(deltas):
        pk, pv = d.key_value()
        sel = (row == k).view(-1, 1, 1, 1)
        pad = n_max - d.n
        pk = torch.nn.functional.pad(pk, (0, 0, 0, pad)).to(x.device, x.dtype)
        pv = torch.nn.functional.pad(pv, (0, 0, 0, pad)).to(x.device, x.dtype)
        keys = torch.where(sel, pk if pk.dim() == 4 else pk.unsqueeze(0), keys)
        values = torch.where(sel, pv if pv.dim() == 4 else pv.unsqueeze(0), values)
    key = cache_key(module, call)
    cache = _PrefixCache(call.get(key), keys, values)
    past = cache.past_length(getattr(module, "layer_idx", None))
    visible = torch.arange(n_max, device=x.device)[None, :] < lens[:, None]           # (B, n_max)
    call["attention_mask"] = _widen_mask(call.get("attention_mask"), visible, q, past,
                                         causal=bool(getattr(module, "is_causal", False)), dtype=x.dtype)
    call[key] = cache
    return inner(x, **call)


def shifted_positions(inner, module: nn.Module, deltas: Sequence[Any], row: Tensor, x, args, kwargs):
    """Run a backbone with each row's real-token positions shifted by its prefix length
    (row (B,) indexes ``deltas``, each offering ``n``; -1 = no shift)."""
    first, call = _arguments(module, x, args, kwargs)
    ids = call.pop(first, None)
    lead = ids if ids is not None else call["inputs_embeds"]
    B, T = lead.shape[:2]
    lens = torch.tensor([d.n for d in deltas] + [0], device=lead.device)[row]         # (B,)
    pos = call.get("position_ids")
    if pos is None:
        past = call.get(cache_key(module, call))
        start = int(past.get_seq_length()) if past is not None and hasattr(past, "get_seq_length") else 0
        pos = torch.arange(start, start + T, device=lead.device)[None]
    call["position_ids"] = pos.expand(B, -1) + lens[:, None]
    return inner(ids, **call)


def _widen_mask(mask: Tensor | None, visible: Tensor, q: int, past: int, *, causal: bool,
                dtype: torch.dtype) -> Tensor:
    """The module's 4D mask (or the implicit one) with n_max prefix columns in front.

    visible: (B, n_max) bool. Returns (B, 1, q, n_max + kv) in the mask's format
    (bool: True = attend; float: additive 0 / -inf-like).
    """
    B = visible.shape[0]
    pre = visible[:, None, None, :].expand(B, 1, q, visible.shape[1])
    if mask is None:
        kv = past + q
        if causal:
            i = torch.arange(q, device=visible.device)[:, None]
            j = torch.arange(kv, device=visible.device)[None, :]
            main = (j <= past + i)[None, None].expand(B, 1, q, kv)     # bottom-right aligned
        else:
            main = torch.ones(B, 1, q, kv, dtype=torch.bool, device=visible.device)
        full = torch.cat([pre, main], dim=-1)
        # additive float: both the eager path (adds the mask) and sdpa accept it
        return torch.zeros(full.shape, dtype=dtype, device=full.device).masked_fill(~full, torch.finfo(dtype).min)
    mask = mask.expand(B, *mask.shape[1:-2], q, mask.shape[-1]) if mask.shape[0] != B else mask
    if mask.dim() != 4:
        raise ConfigError(f"prefix tuning expected a 4D attention mask in the attention module, found {mask.dim()}D")
    pre = pre.expand(B, mask.shape[1], q, pre.shape[-1])
    if mask.dtype == torch.bool:
        return torch.cat([pre, mask], dim=-1)
    fill = torch.zeros(pre.shape, dtype=mask.dtype, device=mask.device).masked_fill(~pre, torch.finfo(mask.dtype).min)
    return torch.cat([fill, mask], dim=-1)


def _remove_module(root: nn.Module, target: nn.Module) -> None:
    """Unregister ``target`` wherever the core keeps it, dropping containers left empty
    (the shared module's home is the core's business; we only look it up by identity)."""
    parents = [(m, k) for m in root.modules() for k, c in m._modules.items() if c is target]
    for parent, key in parents:
        del parent._modules[key]
        if isinstance(parent, nn.ModuleDict) and len(parent) == 0:
            for m in root.modules():
                for k, c in list(m._modules.items()):
                    if c is parent:
                        del m._modules[k]


@torch.no_grad()
def fold_prefix(adapter: Adapter) -> None:
    """Replace the reparametrisation network by the per-layer prefixes it produces.

    Afterwards the adapter stores 2 L n d_kv numbers and its config says
    ``reparam=False``; outputs are unchanged.
    """
    cfg = adapter.config
    if not isinstance(cfg, PrefixTuningConfig) or not cfg.reparam:
        raise ConfigError("fold_prefix: expected a prefix-tuning adapter with reparam=True")
    for _, d in adapter.deltas():
        if d.role == "backbone":
            continue
        kv = d._shared()[:, d.slot]                                  # (n, 2, d_kv)
        d.prefix_key = nn.Parameter(kv[:, 0].clone())
        d.prefix_value = nn.Parameter(kv[:, 1].clone())
        object.__delattr__(d, "_shared")
    _remove_module(adapter.model, adapter.shared)
    adapter.shared = None
    adapter.config = cfg.replace(reparam=False)
