"""The unified design space of He et al. 2022 (https://arxiv.org/abs/2110.04366), and MAM.

He et al. write adapters, LoRA and prefix tuning as one operation: a modification
``dh = f(z)`` composed with a hidden state ``h`` of the frozen model,

    h' = h + s * f(z),   f in {low-rank linear  z W_down W_up,
                               bottleneck MLP   act(z W_down + b) W_up + b,
                               scaling          l * z},
    z = h (sequential insertion) or the sub-layer's input (parallel insertion),

at the attention and / or FFN sub-layer, with composition additive (s = 1), scaled
(s fixed) or gated (``(1 - lam(z)) h + lam(z) dh``, eq. 7; here lam is a learned
sigmoid gate per position). Prefix tuning is the attention-head modification
``softmax(x W_q P_k^T) P_v`` with gated composition by construction; it is the
``prefix_length`` knob (0 = off) and combines with any of the above.

:class:`UnifiedConfig` is that space as one flat typed config (every knob a
``Literal`` or a number), so a search can propose points directly. Named methods
are points of it (LoRA's scale s = alpha / r):

=================  ==========  ==============  ============  ===========  ========  ======
method             position    attention_site  modification  insertion    compos.   prefix
=================  ==========  ==============  ============  ===========  ========  ======
LoRA               attention   qv              lowrank       parallel     scaled    0
Houlsby            both        output          mlp           sequential   additive  0
Pfeiffer           ffn         -               mlp           sequential   additive  0
parallel adapter   ffn         -               mlp           parallel     additive  0
scaled PA          ffn         -               mlp           parallel     scaled 4  0
prefix tuning      none        -               -             -            (gated)   n
MAM (preset)       ffn         -               mlp           parallel     scaled 4  30
=================  ==========  ==============  ============  ===========  ========  ======

Where things attach (bert / gpt2 / llama): attention ``output`` sequential = after
the attention output projection (``attention.output.dense`` / ``attn.c_proj`` /
``o_proj``); attention ``output`` parallel = beside the attention block
(``attention`` / ``attn`` / ``self_attn``); ``qv`` = the query and value projections
(GPT-2's fused ``c_attn``); FFN sequential = after the FFN output projection; FFN
parallel = beside the FFN block (``layer.N.output`` reading the FFN input / ``mlp``);
prefixes = the self-attention module (``attention.self`` / ``attn`` / ``self_attn``),
plus the backbone, which shifts real-token positions by n as prefix tuning does.
Exact equivalence with deltakit's own ``lora``, ``houlsby``, ``scaled_parallel`` and
``prefix_tuning`` at equal weights is tested.

>>> import deltakit as dk
>>> from transformers import GPT2Config, GPT2LMHeadModel
>>> m = GPT2LMHeadModel(GPT2Config(vocab_size=50, n_embd=8, n_layer=2, n_head=2, n_positions=16,
...                                bos_token_id=0, eos_token_id=1))
>>> cfg = dk.get_method("mam").config(prefix_length=2, r=4)
>>> dk.attach(m, cfg).num_parameters()   # L (2 n d + 2 r d + r + d) = 2 (32 + 64 + 4 + 8)
216
"""
from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import ClassVar, Literal

import torch
from torch import Tensor, nn

from ..core.delta import BuildContext, param_dtype
from ..core.fields import knob
from ..core.registry import ConfigError, DeltaConfig, register_method
from ._adapter_common import Branch, BranchDelta, module_width
from .prefix_tuning import kv_layout, prefixed_attention, shifted_positions

__all__ = ["UnifiedConfig", "MamConfig", "Unified", "SITES"]

_P = r"(?:.*\.)?"
#: family-agnostic path patterns (BERT | GPT-2 | Llama) of each attachment site
SITES: dict[str, str] = {
    "backbone": r"(?:bert|roberta|electra|transformer|model)",  # prefixes shift positions here
    "prefix": _P + r"(?:layer\.\d+\.attention\.self|h\.\d+\.attn|layers\.\d+\.self_attn)",
    "attention_sequential": _P + r"(?:layer\.\d+\.attention\.output\.dense|h\.\d+\.attn\.c_proj"
                                 r"|layers\.\d+\.self_attn\.o_proj)",
    "attention_parallel": _P + r"(?:layer\.\d+\.attention|h\.\d+\.attn|layers\.\d+\.self_attn)",
    "qv": _P + r"(?:layer\.\d+\.attention\.self\.(?:query|value)|h\.\d+\.attn\.c_attn"
               r"|layers\.\d+\.self_attn\.(?:q_proj|v_proj))",
    "ffn_sequential": _P + r"(?:layer\.\d+\.output\.dense|h\.\d+\.mlp\.c_proj|layers\.\d+\.mlp\.down_proj)",
    "ffn_parallel": _P + r"(?:layer\.\d+\.output|h\.\d+\.mlp|layers\.\d+\.mlp)",
}


@dataclass(frozen=True)
class UnifiedConfig(DeltaConfig):
    """One point of He et al.'s design space (see the module table)."""

    position: Literal["none", "attention", "ffn", "both"] = knob(
        "ffn", doc="sub-layer(s) the modification f is applied at (``none``: prefixes only)")
    attention_site: Literal["output", "qv"] = knob(
        "output", doc="at the attention sub-layer, ``output`` (its output projection / the whole block) or ``qv``"
                      " (the query and value projections, as LoRA)")
    modification: Literal["lowrank", "mlp", "scaling"] = knob(
        "mlp", doc="f: ``lowrank`` (linear, no bias), ``mlp`` (bottleneck with ``non_linearity``) or "
                   "``scaling`` (elementwise vector)")
    insertion: Literal["sequential", "parallel"] = knob(
        "parallel", doc="``sequential`` (f reads h) or ``parallel`` (f reads the sub-layer input)")
    composition: Literal["additive", "scaled", "gated"] = knob(
        "scaled", doc="``additive``, ``scaled`` (by ``scale``) or ``gated``")
    r: int = knob(64, ge=1, log=True, doc="rank / bottleneck width of f")
    scale: float = knob(4.0, doc="s of the scaled composition")
    non_linearity: Literal["relu", "gelu", "swish", "tanh"] = knob(
        "relu", doc="activation of the ``mlp`` modification")
    init: Literal["lora", "houlsby"] = knob(
        "lora", doc="``lora`` (W_up = 0, exact identity) or ``houlsby`` (truncated N(0, 1e-2))")
    prefix_length: int = knob(0, ge=0, doc="prefix tuning's n at every self-attention layer (0 = off)")
    prefix_init_std: float = knob(1.0, ge=0, doc="std of the initial prefixes")
    dropout: float = knob(0.0, ge=0, lt=1, doc="dropout on the branch input (training only)")

    def validate(self) -> None:
        name = type(self).__name__
        if self.position == "none" and self.prefix_length == 0:
            raise ConfigError(f"{name}: position='none' with prefix_length=0 changes nothing; "
                              "expected a position or a prefix")
        # Targets follow the knobs: derived when not given, and re-derived when they are
        # site patterns (so ``config.replace(position=...)`` does not keep stale sites).
        auto = {f"re:{p}" for p in SITES.values()}
        if self.targets is None or set(self.targets) <= auto:
            object.__setattr__(self, "targets", tuple(f"re:{p}" for p in site_patterns(self).values()))

    @property
    def sites(self) -> dict[str, str]:
        return site_patterns(self)


@dataclass(frozen=True)
class MamConfig(UnifiedConfig):
    """MAM adapter (He et al. section 4.6): prefix tuning with a small prefix at the
    attention heads + a scaled parallel adapter (s = 4) on the FFN. Fields:
    :class:`UnifiedConfig`, with the paper's l = 30, r = 512."""

    method: ClassVar[str] = ""
    r: int = 512
    prefix_length: int = 30


def site_patterns(cfg: UnifiedConfig) -> dict[str, str]:
    """role -> path regex of every site the config touches."""
    out: dict[str, str] = {}
    if cfg.prefix_length:
        out["backbone"] = SITES["backbone"]
        out["prefix"] = SITES["prefix"]
    if cfg.position in ("attention", "both"):
        out["attention"] = SITES["qv"] if cfg.attention_site == "qv" else SITES[f"attention_{cfg.insertion}"]
    if cfg.position in ("ffn", "both"):
        out["ffn"] = SITES[f"ffn_{cfg.insertion}"]
    return out


@register_method("unified", UnifiedConfig, paper="https://arxiv.org/abs/2110.04366",
                 description="He et al.'s unified PEFT design space (function x insertion x position x composition + prefix)")
class Unified(BranchDelta):
    """The delta at one site: prefixes (attention module), a branch, or both."""

    supported: ClassVar[tuple[type, ...]] = ()

    def __init__(self, base: nn.Module, config: UnifiedConfig, ctx: BuildContext | None = None):
        super().__init__()
        name = ctx.name if ctx is not None else ""
        roles = {role for role, pat in site_patterns(config).items() if re.fullmatch(pat, name)}
        if not roles:
            if config.position == "none":
                raise ConfigError(f"unified: target {name!r} is not a self-attention module, and only "
                                  "prefixes are configured")
            roles = {"branch"}
        object.__setattr__(self, "_attn", base)
        self.role = "backbone" if "backbone" in roles else "site"
        self.branch = None
        if self.role == "backbone":
            self.n = config.prefix_length  # no parameters: shifts real-token positions by n
            return
        kw = dict(dtype=param_dtype(base, config.adapter_dtype), device=next(base.parameters()).device)
        self.n = config.prefix_length if "prefix" in roles else 0
        if self.n:
            self.heads, self.head_dim = kv_layout(base)
            d_kv = self.heads * self.head_dim
            self.prefix_key = nn.Parameter(torch.randn(self.n, d_kv, **kw) * config.prefix_init_std)
            self.prefix_value = nn.Parameter(torch.randn(self.n, d_kv, **kw) * config.prefix_init_std)
        if roles - {"prefix"}:
            d_in, d_out = module_width(base)
            self.insertion, self.composition, self.scale = config.insertion, config.composition, config.scale
            self.branch_in = d_out if config.insertion == "sequential" else d_in
            self.branch = Branch(self.branch_in, d_out, config.r, kind=config.modification,
                                 non_linearity=config.non_linearity, init=config.init, dropout=config.dropout, **kw)
            self._init_gate(self.branch_in, **kw)

    def key_value(self) -> tuple[Tensor, Tensor]:
        shape = (self.n, self.heads, self.head_dim)
        if not self.n:
            empty = torch.zeros(self.heads, 0, self.head_dim)
            return empty, empty
        return (self.prefix_key.reshape(shape).transpose(0, 1), self.prefix_value.reshape(shape).transpose(0, 1))

    def forward(self, inner, x, *args, **kwargs):
        lead = x if isinstance(x, Tensor) else kwargs.get("inputs_embeds")
        row = torch.zeros(lead.shape[0], dtype=torch.long, device=lead.device)
        return _run(inner, self._attn, [self], row, x, args, kwargs)

    @classmethod
    def mixed_forward(cls, base: nn.Module, deltas: Sequence["Unified"], row: Tensor, x, *args, **kwargs):
        return _run(base, base, deltas, row, x, args, kwargs)

    @classmethod
    def contract_config(cls, kind: str) -> DeltaConfig | None:
        if kind == "conv":
            return None
        return UnifiedConfig(position="both", r=4, prefix_length=2, composition="gated")


@register_method("mam", MamConfig, paper="https://arxiv.org/abs/2110.04366",
                 description="MAM adapter: small prefix on attention + scaled parallel adapter on the FFN")
class Mam(Unified):
    @classmethod
    def contract_config(cls, kind: str) -> DeltaConfig | None:
        return None if kind == "conv" else MamConfig(r=4, prefix_length=3)


def _run(inner, module: nn.Module, deltas: Sequence[Unified], row: Tensor, x, args, kwargs):
    if deltas[0].role == "backbone":
        return shifted_positions(inner, module, deltas, row, x, args, kwargs)
    if any(d.n for d in deltas):
        for d in deltas:  # adapters without prefixes here still need the layout to pad
            if not d.n:
                d.heads, d.head_dim = kv_layout(module)
        out = prefixed_attention(inner, module, deltas, row, x, args, kwargs)
    else:
        out = inner(x, *args, **kwargs)
    if all(d.branch is None for d in deltas):
        return out
    h = out[0] if isinstance(out, tuple) else out
    new = h
    for k, d in enumerate(deltas):
        if d.branch is not None:
            keep = (row == k).view(-1, *([1] * (h.dim() - 1)))
            new = torch.where(keep, d.compose(h, d._z(h, x, args)), new)
    return (new, *out[1:]) if isinstance(out, tuple) else new
