"""UniPELT (Mao et al. 2022, "UniPELT: A Unified Framework for Parameter-Efficient Language
Model Tuning", ACL 2022, https://arxiv.org/abs/2110.07577).

Three submodules in every layer, each switched by its own learned gate computed from the
hidden states it reads (sigma = sigmoid, mean over the positions of the call):

    LoRA on W_q, W_v:   h = W x + G_L B A x,                         G_L = mean_t sigma(x_t W_GL + b_GL)
    prefix tuning:      K = [G_P P_K ; x W_k],  V = [G_P P_V ; x W_v], G_P = mean_t sigma(x_t W_GP + b_GP)
    bottleneck adapter: h_A = h_F + G_A f(h_F W_down + b) W_up + b,  G_A = mean_t sigma(h_F,t W_GA + b_GA)

with x the self-attention input and h_F the feed-forward sub-layer's output. Every gate is
one ``Linear(d, 1)`` per submodule and layer (LoRA has one per projection), one scalar per
batch row. ``components`` picks the submodules (the paper's UniPELT (AP) is
``("adapter", "prefix")``; the default is the full UniPELT (APL)).

What follows the official code (github.com/morningmoni/UniPELT), where the paper leaves it
open: the LoRA gate *replaces* LoRA's ``alpha / r`` scale (its ``LoRA_Linear`` overwrites
``scaling`` with the gate), so there is no ``alpha``; gates average over every position
of the call, padding included; gate weights ~ N(0, 0.02) with zero bias (BERT's
``initializer_range``: every gate starts near 0.5), adapter projections ~ N(0, 0.02) with
zero biases (``init_bert_weights``), LoRA's A Kaiming-uniform and B zero; prefixes sit
inside each attention layer without shifting the real tokens' positions. Defaults are the
paper's: prefix length 10, LoRA r = 8, adapter reduction factor 16 (m = d / 16, ReLU).

Deliberate differences: the official prefixes come from a reparametrisation MLP during
training (an optimisation aid; the paper counts the 2 L n d prefix numbers, which is what is
trained and stored here, initialised N(0, ``prefix_init_std``)); the adapter sits after the
FFN output projection as deltakit's ``pfeiffer`` preset (``h_F + G_A f(h_F)``), where
adapter-transformers' Pfeiffer placement also re-applies the block's LayerNorm around it.
GPT-2 fuses q, k, v in ``c_attn``, so there the gated LoRA covers all three.

Sites (bert / gpt2 / llama): prefixes on the self-attention module; LoRA on
``query``/``value`` (``c_attn``, ``q_proj``/``v_proj``); the adapter after the FFN output
projection. Not mergeable (the gates depend on the input). Under incremental decoding a
gate sees only the new tokens of each step (the method was built for encoders).

>>> import deltakit as dk
>>> from transformers import BertConfig, BertModel
>>> m = BertModel(BertConfig(vocab_size=50, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
...                          intermediate_size=32))
>>> ad = dk.attach(m, dk.get_method("unipelt").config(r=2, prefix_length=3))
>>> ad.num_parameters()   # LoRA 2 (2 r d + d + 1) + prefix 2 n d + d + 1 + adapter 2 m d + m + d + d + 1
341
"""
from __future__ import annotations

import math
import re
from collections.abc import Sequence
from dataclasses import dataclass
from types import SimpleNamespace
from typing import ClassVar, Literal

import torch
from torch import Tensor, nn

from ..core.delta import ActivationDelta, BuildContext, param_dtype
from ..core.fields import knob
from ..core.registry import ConfigError, DeltaConfig, register_method
from ._adapter_common import Branch, module_width
from ._banks import linear_shape
from .lora import _cast
from .prefix_tuning import kv_layout, prefixed_attention
from .unified import SITES

__all__ = ["UniPeltConfig", "UniPELT", "gate_value", "COMPONENTS"]

COMPONENTS = ("adapter", "prefix", "lora")
#: component -> the site (see :data:`deltakit.methods.unified.SITES`) it attaches to
_SITE = {"prefix": "prefix", "lora": "qv", "adapter": "ffn_sequential"}


@dataclass(frozen=True)
class UniPeltConfig(DeltaConfig):
    """UniPELT hyper-parameters (defaults: the paper's)."""

    components: tuple[str, ...] = knob(
        COMPONENTS, doc="submodules to use, each gated: ``\"adapter\"``, ``\"prefix\"``, ``\"lora\"`` (all three: "
                        "UniPELT (APL); adapter + prefix: UniPELT (AP))")
    r: int = knob(8, ge=1, log=True, doc="rank of the gated LoRA on the query and value projections")
    prefix_length: int = knob(10, ge=1, doc="n, prefix vectors per self-attention layer")
    prefix_init_std: float = knob(1.0, ge=0, doc="std of the initial prefixes")
    reduction_factor: int = knob(16, ge=1, log=True, doc="adapter bottleneck m = d // reduction_factor")
    non_linearity: Literal["relu", "gelu", "swish", "tanh"] = knob("relu", doc="activation inside the adapter")
    init_std: float = knob(0.02, ge=0, doc="std of the gate weights and the adapter projections (biases zero), "
                                           "BERT's initializer_range as in the official code")

    def validate(self) -> None:
        bad = [c for c in self.components if c not in COMPONENTS]
        if bad or not self.components or len(set(self.components)) != len(self.components):
            raise ConfigError(f"UniPeltConfig.components: expected distinct names from {list(COMPONENTS)}, "
                              f"found {list(self.components)}")
        # targets follow the components unless the caller chose other modules
        auto = {f"re:{SITES[s]}" for s in _SITE.values()}
        if self.targets is None or set(self.targets) <= auto:
            object.__setattr__(self, "targets", tuple(f"re:{SITES[_SITE[c]]}" for c in COMPONENTS
                                                      if c in self.components))


def gate_value(gate: nn.Linear, z: Tensor) -> Tensor:
    """``mean_t sigmoid(z_t W + b)``: one gate per row, shaped to broadcast against ``z``.

    z (B, T, d) -> (B, 1, 1); z (B, d) -> (B, 1).
    """
    g = torch.sigmoid(gate(z.to(gate.weight.dtype)))               # (B, ..., 1)
    if g.dim() > 2:
        g = g.mean(dim=tuple(range(1, g.dim() - 1)), keepdim=True)
    return g


def _gate(width: int, std: float, **kw) -> nn.Linear:
    gate = nn.Linear(width, 1, **kw)
    with torch.no_grad():
        nn.init.normal_(gate.weight, std=std)
        nn.init.zeros_(gate.bias)
    return gate


def _role(config: UniPeltConfig, name: str) -> str:
    roles = [c for c in config.components if re.fullmatch(SITES[_SITE[c]], name)]
    if len(roles) != 1:
        raise ConfigError(f"unipelt: expected target {name!r} to be a self-attention module, a query / value "
                          f"projection or an FFN output projection of the components {list(config.components)}; "
                          f"it matches {roles or 'none'}")
    return roles[0]


@register_method("unipelt", UniPeltConfig, paper="https://arxiv.org/abs/2110.07577",
                 description="gated LoRA (q, v) + gated prefix tuning + gated bottleneck adapter (FFN)")
class UniPELT(ActivationDelta):
    """The UniPELT submodule at one site: ``role`` is ``lora``, ``prefix`` or ``adapter``."""

    supported: ClassVar[tuple[type, ...]] = ()

    def __init__(self, base: nn.Module, config: UniPeltConfig, ctx: BuildContext | None = None):
        super().__init__()
        self.role = _role(config, ctx.name if ctx is not None else "")
        kw = dict(dtype=param_dtype(base, config.adapter_dtype), device=next(base.parameters()).device)
        if self.role == "lora":
            fan_in, fan_out = linear_shape(base, "unipelt")
            self.lora_A = nn.Parameter(torch.empty(config.r, fan_in, **kw))        # (r, in)
            self.lora_B = nn.Parameter(torch.zeros(fan_out, config.r, **kw))       # (out, r)
            with torch.no_grad():
                nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))
            width = fan_in
        elif self.role == "prefix":
            object.__setattr__(self, "_attn", base)  # a reference: the frozen module's signature
            self.n = config.prefix_length
            self.heads, self.head_dim = kv_layout(base)
            d_kv = self.heads * self.head_dim
            self.prefix_key = nn.Parameter(torch.randn(self.n, d_kv, **kw) * config.prefix_init_std)
            self.prefix_value = nn.Parameter(torch.randn(self.n, d_kv, **kw) * config.prefix_init_std)
            width = module_width(base)[0]
        else:
            width = module_width(base)[1]
            m = max(1, width // config.reduction_factor)
            self.branch = Branch(width, width, m, kind="mlp", non_linearity=config.non_linearity, **kw)
            with torch.no_grad():
                for lin in (self.branch.down, self.branch.up):
                    nn.init.normal_(lin.weight, std=config.init_std)
        self.gate = _gate(width, config.init_std, **kw)

    # ------------------------------------------------------------ maths
    def _gated_prefix(self, x: Tensor) -> SimpleNamespace:
        """What :func:`prefixed_attention` reads, with this row-wise gate applied: K, V (B, H, n, hd)."""
        g = gate_value(self.gate, x).reshape(-1, 1, 1, 1)                     # (B, 1, 1, 1)
        shape = (self.n, self.heads, self.head_dim)
        K = self.prefix_key.reshape(shape).transpose(0, 1)                    # (H, n, hd)
        V = self.prefix_value.reshape(shape).transpose(0, 1)
        return SimpleNamespace(n=self.n, heads=self.heads, head_dim=self.head_dim,
                               key_value=lambda: (g * K, g * V))

    def _change(self, h: Tensor, x: Tensor) -> Tensor:
        """The gated LoRA or adapter output added to ``h`` (the target's output)."""
        if self.role == "lora":
            A, B = self.lora_A, self.lora_B
            dh = (_cast(x, A) @ A.t()) @ B.t()                                # (..., out)
            return h + (gate_value(self.gate, x) * dh).to(h.dtype)
        w = self.branch.down.weight
        z = h.to(w.dtype)
        return h + (gate_value(self.gate, z) * self.branch(z)).to(h.dtype)

    def forward(self, inner, x, *args, **kwargs):
        if self.role == "prefix":
            row = torch.zeros(x.shape[0], dtype=torch.long, device=x.device)
            return prefixed_attention(inner, self._attn, [self._gated_prefix(x)], row, x, args, kwargs)
        out = inner(x, *args, **kwargs)
        h = out[0] if isinstance(out, tuple) else out
        new = self._change(h, x)
        return (new, *out[1:]) if isinstance(out, tuple) else new

    @classmethod
    def mixed_forward(cls, base: nn.Module, deltas: Sequence["UniPELT"], row: Tensor, x, *args, **kwargs):
        """Rows of different adapters in one pass: prefixes padded per row (prefix tuning's
        path), else every adapter's change on every row, kept where the row is its own."""
        if deltas[0].role == "prefix":
            return prefixed_attention(base, base, [d._gated_prefix(x) for d in deltas], row, x, args, kwargs)
        out = base(x, *args, **kwargs)
        h = out[0] if isinstance(out, tuple) else out
        new = h
        for k, d in enumerate(deltas):
            keep = (row == k).view(-1, *([1] * (h.dim() - 1)))
            new = torch.where(keep, d._change(h, x), new)
        return (new, *out[1:]) if isinstance(out, tuple) else new

    @classmethod
    def contract_config(cls, kind: str) -> DeltaConfig | None:
        return None if kind == "conv" else UniPeltConfig(r=2, prefix_length=2, reduction_factor=4)

    def extra_repr(self) -> str:
        return f"role={self.role}"
