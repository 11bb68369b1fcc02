"""VB-LoRA: Extreme Parameter Efficient Fine-Tuning with Vector Banks (Li et al., 2024)
https://arxiv.org/abs/2405.15179

    every length-b sub-vector v of A (r, in) and B (out, r) is a top-k admixture of one
    global bank V (h, b):   v = sum_{j in topk(z)} softmax(z_topk)_j * V_j,   dW = B @ A

``z`` (h logits) is trained per sub-vector; A's rows are cut into ``in / b`` pieces,
B's columns into ``out / b`` pieces, so a target owns ``r * (in + out) / b`` logit
vectors. Trainable: the bank (``h * b``, shared by all targets, stored once under
``deltakit_shared``) plus the logits. Only the top-k logits affect the forward pass
(the softmax runs over them alone, so the top-k selection is differentiable as in the
paper), and with ``save_only_topk`` (the paper's storage) the file holds only the
top-k indices and logit values of each sub-vector: ``h * b + 2 * k * n_sub`` numbers
(k values + k int indices). Loading rebuilds logits whose top-k are exactly the saved
ones, so the loaded forward is bit-identical; the other logits are set below them, so
training resumed from such a file cannot re-select them (``deltakit.train``'s
checkpoints keep every logit; ``save_only_topk=False`` keeps them in the file too).

Init (paper / reference code): bank ~ U(-init_bank_bound, init_bank_bound), logits ~
N(0, init_logits_std). The model does NOT start exactly at the base (the paper's
choice; dW is small at init).

>>> import torch, deltakit as dk
>>> m = torch.nn.Sequential(torch.nn.Linear(8, 4))
>>> cfg = dk.get_method("vb_lora").config(r=2, num_vectors=6, vector_length=4, topk=2, targets=["0"])
>>> ad = dk.attach(m, cfg)
>>> ad.num_parameters()  # bank 6*4 + logits (2*8/4 + 4/4*2) * 6
60
"""
from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from ..core.delta import BuildContext, param_dtype
from ..core.fields import knob
from ..core.registry import ConfigError, DeltaConfig, register_method
from ._banks import FactoredDelta, layout, linear_shape, target_device
from ._base_ops import Conv1D

__all__ = ["VBLoraConfig", "VBLoRA", "VectorBank", "topk_admixture"]

_LOGITS = ("vblora_logits_A", "vblora_logits_B")


@dataclass(frozen=True)
class VBLoraConfig(DeltaConfig):
    """VB-LoRA hyper-parameters."""

    r: int = knob(4, ge=1, doc="rank of the composed A (r, in) and B (out, r)")
    num_vectors: int = knob(256, ge=1, log=True, doc="``h``, vectors in the shared bank")
    vector_length: int = knob(256, ge=1, doc="``b``, length of a bank vector; must divide every target's in and out")
    topk: int = knob(2, ge=1, doc="``k``, bank vectors mixed into each sub-vector")
    init_bank_bound: float = knob(0.02, ge=0, doc="the bank starts U(-bound, bound)")
    init_logits_std: float = knob(0.1, ge=0, doc="the logits start N(0, std)")
    save_only_topk: bool = knob(True, doc="store only each sub-vector's top-k indices and logits (paper)")

    def validate(self) -> None:
        if self.topk > self.num_vectors:
            raise ConfigError(f"VBLoraConfig.topk: expected at most num_vectors={self.num_vectors}, "
                              f"found {self.topk}")


class VectorBank(nn.Module):
    """The adapter-wide bank of ``h`` vectors of length ``b``."""

    def __init__(self, h: int, b: int, bound: float, device: torch.device, dtype: torch.dtype):
        super().__init__()
        self.vector_bank = nn.Parameter(torch.empty(h, b, device=device, dtype=dtype).uniform_(-bound, bound))


def topk_admixture(logits: Tensor, bank: Tensor, k: int) -> Tensor:
    """``(..., h)`` logits, ``(h, b)`` bank -> ``(..., b)``: softmax over the top-k logits
    weighting their bank vectors (gradients reach only the selected logits and vectors)."""
    vals, idx = logits.topk(k, dim=-1)                 # (..., k)
    w = torch.softmax(vals, dim=-1)                    # (..., k)
    return torch.einsum("...k,...kb->...b", w, bank[idx])


@register_method("vb_lora", VBLoraConfig, paper="https://arxiv.org/abs/2405.15179",
                 description="LoRA factors composed from a global vector bank by top-k softmax admixtures")
class VBLoRA(FactoredDelta):
    supported = (nn.Linear, Conv1D)

    @classmethod
    def build_shared(cls, config: VBLoraConfig, targets: Mapping[str, nn.Module]) -> nn.Module:
        first = next(iter(targets.values()))
        return VectorBank(config.num_vectors, config.vector_length, config.init_bank_bound,
                          target_device(targets), param_dtype(first, config.adapter_dtype))

    def __init__(self, base: nn.Module, config: VBLoraConfig, ctx: BuildContext):
        super().__init__()
        fan_in, fan_out = linear_shape(base, "VB-LoRA")
        b, h, r = config.vector_length, config.num_vectors, config.r
        if fan_in % b or fan_out % b:
            raise ConfigError(f"VB-LoRA on {ctx.name}: expected vector_length to divide in={fan_in} and "
                              f"out={fan_out}, found vector_length={b}")
        object.__setattr__(self, "_shared", ctx.shared)   # the bank lives once, on the model
        dev = next(base.parameters()).device
        dtype = param_dtype(base, config.adapter_dtype)
        self.layout = layout(base)
        self.scale = 1.0
        self.r, self.k, self.fan_in, self.fan_out = r, config.topk, fan_in, fan_out
        self.save_only_topk = config.save_only_topk
        std = config.init_logits_std
        # A (r, in): row i is in/b sub-vectors; B (out, r): column j is out/b sub-vectors.
        self.vblora_logits_A = nn.Parameter(torch.randn(r, fan_in // b, h, device=dev, dtype=dtype) * std)
        self.vblora_logits_B = nn.Parameter(torch.randn(fan_out // b, r, h, device=dev, dtype=dtype) * std)

    def low_rank(self) -> tuple[Tensor, Tensor]:
        bank = self._shared.vector_bank
        A = topk_admixture(self.vblora_logits_A, bank, self.k).reshape(self.r, self.fan_in)   # (r, in)
        # (out/b, r, b) -> (out/b, b, r) -> (out, r): column j of B is the concatenation over out/b
        B = topk_admixture(self.vblora_logits_B, bank, self.k).transpose(1, 2).reshape(self.fan_out, self.r)
        return A, B

    # ----------------------------------------------------------- top-k storage
    # The file format is the module's state_dict, so the paper's "store only top-k"
    # lives in these two standard nn.Module hooks.
    def _save_to_state_dict(self, destination, prefix, keep_vars):
        if not self.save_only_topk:
            return super()._save_to_state_dict(destination, prefix, keep_vars)
        for name in _LOGITS:
            z = getattr(self, name)
            vals, idx = z.detach().topk(self.k, dim=-1)
            destination[f"{prefix}{name}_topk_values"] = vals if keep_vars else vals.clone()
            destination[f"{prefix}{name}_topk_indices"] = idx

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys,
                              unexpected_keys, error_msgs):
        if not self.save_only_topk:
            return super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys,
                                                 unexpected_keys, error_msgs)
        for name in _LOGITS:
            z = getattr(self, name)
            kv, ki = f"{prefix}{name}_topk_values", f"{prefix}{name}_topk_indices"
            if kv not in state_dict or ki not in state_dict:
                missing_keys.extend(k for k in (kv, ki) if k not in state_dict)
                continue
            vals, idx = state_dict[kv].to(z), state_dict[ki].to(z.device, torch.long)
            with torch.no_grad():
                # Everything else strictly below the smallest kept logit, so topk picks the
                # same indices (and softmax sees the same values): an exact round trip.
                floor = vals.min() - 1.0 - vals.abs().max()
                z.fill_(float(floor))
                z.scatter_(-1, idx, vals)
        if strict:
            own = {f"{prefix}{n}_topk_{s}" for n in _LOGITS for s in ("values", "indices")}
            unexpected_keys.extend(k for k in state_dict if k.startswith(prefix) and k not in own
                                   and "." not in k[len(prefix):])

    @classmethod
    def contract_config(cls, kind: str) -> VBLoraConfig | None:
        return None if kind == "conv" else VBLoraConfig(r=2, num_vectors=8, vector_length=4, topk=2)
