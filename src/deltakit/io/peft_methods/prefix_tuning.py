"""peft ``PREFIX_TUNING`` <-> deltakit ``prefix_tuning``.

peft keys::

    prompt_embeddings    (n, L * 2 * d_kv)   row i: virtual token i's (layer, key|value, H_kv * hd)
    base_model.<path>.<param>                modules_to_save (e.g. the SEQ_CLS head)

peft saves the prefixes themselves also when it trained them through its projection MLP
(``prefix_projection``), so they are deltakit's folded per-layer ``prefix_key`` /
``prefix_value`` (n, d_kv) of the L attention modules, in layer order. peft feeds
them as a past cache, which shifts the real tokens' positions by n: deltakit does the
same with the backbone among the targets, so import targets the backbone and every
attention module, and export refuses an adapter that leaves either out.
"""
from __future__ import annotations


import torch
from torch import nn

from ...core.adapter import Adapter
from ...core.targets import matches
from ...methods.prefix_tuning import ATTENTION, PrefixTuningConfig, kv_layout
from ._common import PeftExport, PeftFormatError, PeftImport, PeftSource, register_converter
from .prompt_tuning import VirtualTokenConverter, backbone

_KEY = "prompt_embeddings"


def attention_paths(model: nn.Module, modules: dict[str, nn.Module], where: object) -> list[str]:
    """The self-attention modules of ``model`` in layer order."""
    kind = getattr(getattr(model, "config", None), "model_type", None)
    if kind not in ATTENTION:
        raise PeftFormatError(f"{where}: prefix tuning knows the attention modules of {sorted(ATTENTION)}, "
                              f"not model_type {kind!r}")
    return [p for p in modules if any(matches(p, s) for s in ATTENTION[kind])]


@register_converter
class PrefixTuningConverter(VirtualTokenConverter):
    peft_type = "PREFIX_TUNING"
    methods = ("prefix_tuning",)
    what = "prefixes"

    def to_deltakit(self, src: PeftSource) -> PeftImport:
        pe = src.shared.get(_KEY)
        if pe is None:
            raise PeftFormatError(f"{src.where}: no {_KEY} tensor")
        attn = attention_paths(src.model, src.modules, src.where)
        heads, hd = kv_layout(src.modules[attn[0]])
        n, L, d_kv = pe.shape[0], len(attn), heads * hd
        if tuple(pe.shape) != (n, L * 2 * d_kv):
            raise PeftFormatError(f"{src.where}: {_KEY} has shape {tuple(pe.shape)}, expected (n, {L * 2 * d_kv}) "
                                  f"for {L} layers of {d_kv} key/value features")
        kv = pe.reshape(n, L, 2, d_kv)
        state = {}
        for i, p in enumerate(attn):
            state[f"{p}.prefix_key"], state[f"{p}.prefix_value"] = kv[:, i, 0].clone(), kv[:, i, 1].clone()
        targets = [backbone(src.model, src.where), *attn]
        config = PrefixTuningConfig(num_virtual_tokens=n, targets=tuple(targets), modules_to_save=src.full)
        return PeftImport(config, state, targets)

    def from_deltakit(self, adapter: Adapter) -> PeftExport:
        from ...core.targets import _named_modules
        modules = dict(_named_modules(adapter.model))
        attn = attention_paths(adapter.model, modules, f"adapter {adapter.name!r}")
        deltas = dict(adapter.deltas())
        missing = [p for p in [backbone(adapter.model, adapter.name), *attn] if p not in deltas]
        if missing:
            raise PeftFormatError(f"adapter {adapter.name!r}: peft prefixes every attention layer and shifts "
                                  f"positions by n; the adapter leaves out {missing[:3]}")
        kv = []
        for p in attn:
            k, v = deltas[p].key_value()                   # (H_kv, n, hd) each
            kv.append(torch.stack([k.transpose(0, 1).flatten(1), v.transpose(0, 1).flatten(1)], 1))  # (n, 2, d_kv)
        pe = torch.stack(kv, 1).detach()                   # (n, L, 2, d_kv)
        n, d_kv = pe.shape[0], pe.shape[-1]
        fields = {"peft_type": "PREFIX_TUNING", "num_virtual_tokens": n, "token_dim": d_kv,
                  "num_layers": len(attn), "num_attention_heads": None, "num_transformer_submodules": 1,
                  "encoder_hidden_size": d_kv, "prefix_projection": False}
        return PeftExport(fields, {}, {_KEY: pe.reshape(n, -1).contiguous()})
