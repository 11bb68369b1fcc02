"""CorDA: Context-Oriented Decomposition Adaptation (Yang et al., 2024)
"CorDA: Context-Oriented Decomposition Adaptation of Large Language Models for Task-Aware
Parameter-Efficient Fine-tuning", https://arxiv.org/abs/2406.05223

    W C = U S V'^T  (SVD),  V^T = V'^T C^-1,  so W = U S V^T exactly;  C = E[x x^T] over data
    ipm: A0 = sqrt(S_r / s) V_r^T,  B0 = U_r sqrt(S_r / s)   (the r largest components)
    kpm: the same from the r smallest components
    W' = W + s (B A - B0 A0),   A, B trained from A0, B0

The covariance ``C`` of each target's inputs orients the decomposition by the context: in the
instruction-previewed mode (``ipm``) it comes from the downstream task's data and the r
components that matter most to it are adapted; in the knowledge-preserved mode (``kpm``) it
comes from data whose behaviour must be kept (e.g. world-knowledge QA), and only the r
components that matter *least* to it are adapted, the rest frozen. Which data is the
caller's choice; the maths is the same.

As in PiSSA (:mod:`deltakit.methods.pissa`), deltakit never changes the base: the delta
carries the frozen offset ``- s B0 A0``, so the adapted model starts equal to the base and
``W + dW`` equals the paper's ``W_res + s B A`` at every step. The offset depends on the
data, so unlike PiSSA it cannot be re-derived at load: it is always stored (twice LoRA's
file size; the trained parameter count is LoRA's, ``r (in + out)``).

``C`` is damped before inversion as the authors' code (and peft's) do: ``C + d mean(diag C) I``
with ``d = 0.01``, doubled until ``|(C + .) (C + .)^-1 - I|_F < 0.05``. Deliberate differences
from peft 0.21's ``preprocess_corda``: peft divides each forward call's inputs by their
maximum and averages per call; we take ``C = E[x x^T]`` over every (non-padding) token through
the library's one statistics hook (:func:`deltakit.core.stats.collect_grams`). ``B0 A0`` does
not depend on C's scale (nor the damping, which is relative); the split between A0 and B0 does.
Given the same C the factors equal peft's (``tests/methods/test_corda.py``).

The covariance needs data, so attach, then :func:`calibrate` before training (``deltakit
train`` does it from the first ``calibration_batches`` training batches)::

    ad = dk.attach(model, CordaConfig(r=8, mode="kpm"))
    calibrate(ad, batches)          # batches: model(**batch) / model(batch), no labels needed

Until calibrated the adapter refuses to compute (no silent stand-in). Supports ``nn.Linear``
and GPT-2's ``Conv1D`` (as peft).

>>> import torch, deltakit as dk
>>> from deltakit.methods.corda import CordaConfig, calibrate
>>> lin = torch.nn.Sequential(torch.nn.Linear(8, 4))
>>> ad = dk.attach(lin, CordaConfig(r=2, targets=["0"]))
>>> _ = calibrate(ad, [torch.randn(16, 8)])
>>> ad.num_parameters(trainable_only=True)   # r * (in + out)
24
"""
from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any, ClassVar, Literal

import torch
from torch import Tensor, nn

from ..core.adapter import Adapter, disabled
from ..core.delta import BuildContext
from ..core.fields import knob
from ..core.layer import DeltaStateError
from ..core.registry import ConfigError, register_method
from ..core.stats import collect_grams, first_batches
from ._base_ops import Conv1D
from .lora import LoRA, LoraConfig
from .pissa import PiSSA

__all__ = ["CordaConfig", "CorDA", "calibrate", "init_from_covariances", "corda_factors", "covariances"]

# damping as the authors' decomposition.py and peft: start at 1% of the mean diagonal, double
# until the inverse is accurate; a cap so a degenerate C fails instead of looping
_DAMP0, _INV_TOL, _MAX_DOUBLINGS = 0.01, 0.05, 40


@dataclass(frozen=True)
class CordaConfig(LoraConfig):
    """CorDA hyper-parameters: LoRA's (``r``, ``alpha``, ``dropout``, ``use_rslora``) plus the fields below."""

    method: ClassVar[str] = ""

    init: Literal["corda"] = knob("corda", doc="always ``\"corda\"`` (A, B from the SVD of W C, set by calibrate)")
    mode: Literal["ipm", "kpm"] = knob(
        "ipm", doc="``ipm`` (instruction-previewed): adapt the r largest components of W C, C from the task's "
                   "data; ``kpm`` (knowledge-preserved): adapt the r smallest, C from data whose behaviour to keep")
    calibration_batches: int = knob(8, ge=1, doc="training batches whose inputs give C when training calibrates")


def _damped_inverse(cov: Tensor) -> tuple[Tensor, Tensor]:
    """``(C + d mean(diag C) I, its inverse)`` with the smallest ``d = 0.01 * 2^k`` that inverts well."""
    if not torch.isfinite(cov).all():
        raise ValueError("CorDA: expected a finite input covariance, found NaN or inf")
    eye = torch.eye(cov.shape[0], dtype=cov.dtype, device=cov.device)
    damp = _DAMP0
    for _ in range(_MAX_DOUBLINGS):
        fixed = cov + eye * torch.mean(torch.diag(cov)) * damp
        inv = torch.linalg.inv(fixed)
        if torch.dist(fixed @ inv, eye).item() < _INV_TOL:
            return fixed, inv
        damp *= 2
    raise ValueError(f"CorDA: the input covariance stayed singular after damping by {damp:g} x its mean diagonal")


def corda_factors(weight: Tensor, cov: Tensor, r: int, mode: str, scale: float) -> tuple[Tensor, Tensor]:
    """``(A0 (r, in), B0 (out, r))`` of ``weight (out, in)`` under input covariance ``cov (in, in)``,
    with ``scale * B0 @ A0`` the chosen r components of ``W = U S V^T`` (fp32, as peft)."""
    out_dim, in_dim = weight.shape
    if cov.shape != (in_dim, in_dim):
        raise ValueError(f"CorDA: expected an input covariance of shape {(in_dim, in_dim)}, found {tuple(cov.shape)}")
    fixed, inv = _damped_inverse(cov.float())
    U, S, Vh = torch.linalg.svd(weight.float() @ fixed, full_matrices=False)
    V = (Vh @ inv).transpose(0, 1)                          # (in, min)
    sel = slice(0, r) if mode == "ipm" else slice(S.shape[0] - r, S.shape[0])
    root = (S[sel] / scale).sqrt()                          # (r,)
    return (V[:, sel].t() * root[:, None]).contiguous(), (U[:, sel] * root[None, :]).contiguous()


@register_method("corda", CordaConfig, paper="https://arxiv.org/abs/2406.05223",
                 description="LoRA from the SVD of W times the input covariance (ipm: top-r, kpm: bottom-r), "
                             "minus that frozen offset")
class CorDA(PiSSA):
    supported = (nn.Linear, Conv1D)

    def __init__(self, base: nn.Module, config: CordaConfig, ctx: BuildContext | None = None):
        LoRA.__init__(self, base, config, ctx)
        w = base.weight
        mat_shape = tuple(w.shape[::-1]) if self.layout == "conv1d" else tuple(w.shape)   # (out, in)
        if self.r > min(mat_shape):
            raise ConfigError(f"CordaConfig.r: expected at most min(out, in) = {min(mat_shape)} for "
                              f"{ctx.name if ctx else type(base).__name__}, found {self.r}")
        self.mode = config.mode
        with torch.no_grad():
            self.lora_A.zero_()
            self.lora_B.zero_()
        # data-dependent, so always in the file (PiSSA may re-derive its offset from W alone)
        self.register_buffer("offset_A", torch.zeros_like(self.lora_A))
        self.register_buffer("offset_B", torch.zeros_like(self.lora_B))
        self.register_buffer("calibrated", torch.zeros((), dtype=torch.bool, device=w.device))
        self._ready = False   # python mirror of `calibrated`: no device sync per forward

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)
        self._ready = bool(self.calibrated)

    def _check(self) -> None:
        if not self._ready:
            raise DeltaStateError("corda: the adapter is not calibrated yet; call "
                                  "deltakit.methods.corda.calibrate(adapter, batches) first")

    @torch.no_grad()
    def set_covariance(self, base: nn.Module, cov: Tensor) -> None:
        """Initialise A, B and the frozen offset from ``cov`` (in, in) of this target's inputs."""
        if self._ready:
            raise DeltaStateError("corda: already calibrated (re-calibrating would discard the trained factors)")
        w = base.weight.detach()
        mat = w.t() if self.layout == "conv1d" else w
        A0, B0 = corda_factors(mat, cov.to(w.device), self.r, self.mode, self.scale)
        for t, v in ((self.lora_A, A0), (self.lora_B, B0), (self.offset_A, A0), (self.offset_B, B0)):
            t.copy_(v.to(t.dtype))
        self.calibrated.fill_(True)
        self._ready = True

    def offset(self) -> Tensor:
        self._check()
        return super().offset()

    def factors(self):
        self._check()
        return super().factors()

    def residual(self, base: nn.Module, x: Tensor) -> Tensor:
        self._check()
        return super().residual(base, x)

    @classmethod
    def training_hooks(cls, adapter, *, loader=None, total_steps: int | None = None):
        """C comes from the inputs of the first ``calibration_batches`` training batches."""
        calibrate(adapter, first_batches(adapter.model, loader, adapter.config.calibration_batches,
                                         method="corda", purpose="estimate its input covariance"))
        return None, []

    @classmethod
    def contract_config(cls, kind: str) -> None:
        # needs data (calibrate) before it computes anything; tests/methods/test_corda.py runs the contract
        return None


def _corda_layers(adapter: Adapter) -> dict[str, Any]:
    if adapter.spec.name != "corda":
        raise ConfigError(f"corda: expected a 'corda' adapter, found method {adapter.spec.name!r}")
    layers = dict(adapter.layers())
    if any(layer.merged for layer in layers.values()):
        raise DeltaStateError("corda: unmerge the model's adapters first (the base weights must be original)")
    return layers


def covariances(adapter: Adapter, batches: Iterable[Any],
                forward: Callable[[nn.Module, Any], Any] | None = None) -> dict[str, Tensor]:
    """``E[x x^T]`` (in, in) of each target's inputs under the base model (every adapter disabled),
    keyed by target path. ``forward(model, batch)`` defaults to ``model(**batch)`` / ``model(batch)``."""
    layers = _corda_layers(adapter)
    with disabled(adapter.model):
        covs = collect_grams(adapter.model, batches, forward,
                             modules={p: layer.base for p, layer in layers.items()}, mean=True)
    missing = sorted(set(layers) - set(covs))
    if missing:
        raise ValueError(f"corda: expected every target to see inputs, found none reaching {missing}")
    return covs


def init_from_covariances(adapter: Adapter, covs: Mapping[str, Tensor]) -> None:
    """Initialise every target of a CorDA adapter from its input covariance (keyed by target path)."""
    layers = _corda_layers(adapter)
    missing = sorted(set(layers) - set(covs))
    if missing:
        raise ValueError(f"corda: expected a covariance for every target, found none for {missing}")
    for p, layer in layers.items():
        layer.deltas[adapter.name].set_covariance(layer.base, covs[p])


def calibrate(adapter: Adapter, batches: Iterable[Any],
              forward: Callable[[nn.Module, Any], Any] | None = None) -> dict[str, Tensor]:
    """:func:`covariances` then :func:`init_from_covariances`; returns the covariances."""
    covs = covariances(adapter, batches, forward)
    init_from_covariances(adapter, covs)
    return covs
