"""Bottleneck adapters: Houlsby, Pfeiffer, parallel and scaled parallel adapters.

    sequential (Houlsby et al. 2019, https://arxiv.org/abs/1902.00751):
        h' = h + f(h W_down + b_down) W_up + b_up,       h = target(x)
    parallel (He et al. 2022, https://arxiv.org/abs/2110.04366):
        h' = h + s * (f(z W_down + b_down) W_up + b_up),  z = the block's input

W_down: (d, m), W_up: (m, d); m = ``bottleneck_size``; per adapter 2md + m + d
parameters. Presets (each a registered method with its own defaults):

==================  ==========  ================================================  ===  ========
preset              insertion   default targets (bert / gpt2 / llama)             s    init
==================  ==========  ================================================  ===  ========
houlsby             sequential  attn out proj + FFN out proj (both sub-layers)    1    houlsby
pfeiffer            sequential  FFN out proj only (Pfeiffer et al. 2020,          1    houlsby
                                https://arxiv.org/abs/2005.00247)
parallel_adapter    parallel    the FFN block (input = FFN input)                 1    lora
scaled_parallel     parallel    the FFN block                                     4    lora
==================  ==========  ================================================  ===  ========

``houlsby`` init: truncated N(0, 1e-2) on both projections (near identity);
``lora`` init: W_down Kaiming-uniform, W_up = 0 (exact identity, as He et al.'s code).
Not implemented from the papers: Houlsby also trains the base LayerNorms (add them
with ``modules_to_save``), Pfeiffer's adapter-internal LayerNorm/residual variants.
On post-LN BERT the parallel branch is added to ``BertOutput``'s output (after its
LayerNorm); on pre-LN GPT-2 / Llama it is added to the FFN output before the residual.

>>> import torch, deltakit as dk
>>> net = torch.nn.Sequential(torch.nn.Linear(8, 8))
>>> ad = dk.attach(net, dk.get_method("houlsby").config(bottleneck_size=2, targets=["0"]))
>>> ad.num_parameters()   # 2*2*8 + 2 + 8
42
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar, Literal

from torch import nn

from ..core.delta import BuildContext, param_dtype
from ..core.fields import knob
from ..core.registry import DeltaConfig, register_method
from ._adapter_common import Branch, BranchDelta, module_width
from ._base_ops import Conv1D

__all__ = ["BottleneckConfig", "HoulsbyConfig", "PfeifferConfig", "ParallelAdapterConfig",
           "ScaledParallelConfig", "BottleneckAdapter", "FFN_OUT", "FFN_BLOCK"]

# BERT's FFN output projection is ``layer.N.output.dense``; a plain suffix "output.dense"
# would also match ``attention.output.dense``, hence the regexes.
FFN_OUT = {"bert": (r"re:.*layer\.\d+\.output\.dense",), "gpt2": ("mlp.c_proj",), "llama": ("down_proj",)}
ATTN_OUT = {"bert": ("attention.output.dense",), "gpt2": ("attn.c_proj",), "llama": ("o_proj",)}
FFN_BLOCK = {"bert": (r"re:.*layer\.\d+\.output",), "gpt2": ("mlp",), "llama": ("mlp",)}


@dataclass(frozen=True)
class BottleneckConfig(DeltaConfig):
    """Bottleneck adapter hyper-parameters (shared by the four presets)."""

    bottleneck_size: int = knob(64, ge=1, log=True, doc="m, the adapter's hidden width")
    non_linearity: Literal["relu", "gelu", "swish", "tanh"] = knob("relu", doc="f between the projections")
    insertion: Literal["sequential", "parallel"] = knob(
        "sequential", doc="``sequential`` (branch reads the target's output) or ``parallel`` (branch reads the "
                          "target's input, He et al.)")
    scaling: float = knob(1.0, doc="s, multiplies the branch output")
    init: Literal["houlsby", "lora"] = knob(
        "houlsby", doc="``houlsby`` (truncated N(0, 1e-2), near identity) or ``lora`` (W_up = 0, exact "
                       "identity)")
    dropout: float = knob(0.0, ge=0, lt=1, doc="dropout on the branch input (training only)")


@dataclass(frozen=True)
class HoulsbyConfig(BottleneckConfig):
    """Houlsby adapter: sequential, after attention and FFN (fields: :class:`BottleneckConfig`)."""


@dataclass(frozen=True)
class PfeifferConfig(BottleneckConfig):
    """Pfeiffer adapter: sequential, after the FFN only (fields: :class:`BottleneckConfig`)."""


@dataclass(frozen=True)
class ParallelAdapterConfig(BottleneckConfig):
    """He et al.'s parallel adapter on the FFN (fields: :class:`BottleneckConfig`)."""

    insertion: Literal["sequential", "parallel"] = "parallel"
    init: Literal["houlsby", "lora"] = "lora"


@dataclass(frozen=True)
class ScaledParallelConfig(BottleneckConfig):
    """He et al.'s scaled parallel adapter, s = 4 (fields: :class:`BottleneckConfig`)."""

    insertion: Literal["sequential", "parallel"] = "parallel"
    scaling: float = 4.0
    init: Literal["houlsby", "lora"] = "lora"


class BottleneckAdapter(BranchDelta):
    """One bottleneck adapter on one target (see the module docstring)."""

    supported: ClassVar[tuple[type, ...]] = (nn.Linear, Conv1D)

    def __init__(self, base: nn.Module, config: BottleneckConfig, ctx: BuildContext | None = None):
        super().__init__()
        d_in, d_out = module_width(base)
        self.insertion = config.insertion
        self.composition = "scaled"
        self.scale = float(config.scaling)
        width = d_out if config.insertion == "sequential" else d_in
        self.branch_in = width
        dev = next(base.parameters()).device
        self.branch = Branch(width, d_out, config.bottleneck_size, kind="mlp", non_linearity=config.non_linearity,
                             init=config.init, dropout=config.dropout, dtype=param_dtype(base, config.adapter_dtype),
                             device=dev)

    @classmethod
    def contract_config(cls, kind: str) -> DeltaConfig | None:
        return None if kind == "conv" else cls._config(bottleneck_size=4)

    def extra_repr(self) -> str:
        return f"insertion={self.insertion}, scale={self.scale}"


@register_method("houlsby", HoulsbyConfig, paper="https://arxiv.org/abs/1902.00751",
                 description="sequential bottleneck adapters after attention and FFN")
class HoulsbyAdapter(BottleneckAdapter):
    _config = HoulsbyConfig
    default_targets = {k: ATTN_OUT[k] + FFN_OUT[k] for k in FFN_OUT}


@register_method("pfeiffer", PfeifferConfig, paper="https://arxiv.org/abs/2005.00247",
                 description="sequential bottleneck adapter after the FFN only")
class PfeifferAdapter(BottleneckAdapter):
    _config = PfeifferConfig
    default_targets = FFN_OUT


@register_method("parallel_adapter", ParallelAdapterConfig, paper="https://arxiv.org/abs/2110.04366",
                 description="bottleneck adapter parallel to the FFN block")
class ParallelAdapter(BottleneckAdapter):
    supported = ()  # a whole block (any module whose input and output share a width)
    _config = ParallelAdapterConfig
    default_targets = FFN_BLOCK


@register_method("scaled_parallel", ScaledParallelConfig, paper="https://arxiv.org/abs/2110.04366",
                 description="parallel FFN adapter with output scaling s (default 4)")
class ScaledParallelAdapter(BottleneckAdapter):
    supported = ()
    _config = ScaledParallelConfig
    default_targets = FFN_BLOCK
