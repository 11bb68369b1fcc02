"""Routing data computed once, when an adapter enters the library (pure tensor maths, no I/O).

Arrow prototypes (Ostapenko et al. 2024, "Towards Modular LLMs by Building and Reusing a
Library of LoRAs", https://arxiv.org/abs/2405.11157): per layer, the top right-singular
vector of ``dW = scale * B @ A``; a token ``x`` is routed by ``|<x, prototype>|``. For the
LoRA family it comes from the factors without forming ``dW``:

    B = Qb Rb,  A^T = Qa Ra  (thin QR),  Rb Ra^T = U S V^T  (r x r SVD)
    => dW = scale * (Qb U) S (Qa V)^T,   prototype = Qa V[:, 0]          # (in,)

Other weight deltas give a dense ``dW`` (reshaped to ``(out, -1)``) and use a full SVD.

The clustering embedding is a fixed-size sketch of the whole parameter-space delta: a seeded
Gaussian random projection of ``vec(dW)`` over all layers, ``e = sum_l vec(P_l dW_l Q_l^T)``
with ``P_l`` (8, out) and ``Q_l`` (8, in) drawn from a generator seeded by the parameter's
name, entries N(0, 1/8). ``vec(P dW Q^T) = (Q kron P) vec(dW)`` and ``E[(Q kron P)^T (Q kron
P)] = I``, so ``E[<e_a, e_b>] = <dW_a, dW_b>`` summed over layers: inner products (hence
cosines for clustering) are preserved in expectation, for any ranks and targets (a layer an
adapter leaves alone contributes zero), and the LoRA factors give it as ``(P B)(A Q^T)``
without ``dW``. Same seeds, same torch version -> same projections, so sketches stored at
different times compare.
"""
from __future__ import annotations

import hashlib
from collections.abc import Iterable

import torch
from torch import Tensor

from ..taskvec import LowRank

__all__ = ["SKETCH", "EMBEDDING_DIM", "prototype", "layer_sketch", "routing_data", "projection"]

SKETCH = 8  # rows of each side's projection: 8 x 8 = 64 numbers per layer
EMBEDDING_DIM = SKETCH * SKETCH


def _canonical_sign(v: Tensor) -> Tensor:
    """A singular vector is defined up to sign: make the largest-magnitude entry positive so
    that the same adapter always stores the same bytes (Arrow uses ``|<x, p>|`` anyway)."""
    i = int(torch.argmax(v.abs()))
    return -v if v[i] < 0 else v


def prototype(value: LowRank | Tensor) -> Tensor:
    """The top right-singular vector of ``dW`` (float32, ``(in,)``); zeros when ``dW`` is zero
    (an untrained LoRA, ``B = 0``, has no direction to route by)."""
    if isinstance(value, LowRank):
        B, A = value.B.double(), value.A.double()  # (out, r), (r, in)
        Qb, Rb = torch.linalg.qr(B)
        Qa, Ra = torch.linalg.qr(A.T)
        _, S, Vh = torch.linalg.svd(Rb @ Ra.T)  # (r, r)
        top, v = S[0] * abs(value.scale), Qa @ Vh[0]
    else:
        dw = value.double().reshape(value.shape[0], -1)
        _, S, Vh = torch.linalg.svd(dw, full_matrices=False)
        top, v = S[0], Vh[0]
    if top == 0:
        return torch.zeros(v.shape[0], dtype=torch.float32)
    return _canonical_sign(v).float()


def projection(param: str, rows: int, cols: int) -> tuple[Tensor, Tensor]:
    """``(P (8, rows), Q (8, cols))`` for parameter ``param``, seeded by its name (float64)."""
    seed = int.from_bytes(hashlib.sha256(param.encode()).digest()[:8], "little") & ((1 << 63) - 1)
    g = torch.Generator().manual_seed(seed)
    P = torch.randn(SKETCH, rows, generator=g, dtype=torch.float64) / SKETCH ** 0.5
    Q = torch.randn(SKETCH, cols, generator=g, dtype=torch.float64) / SKETCH ** 0.5
    return P, Q


def layer_sketch(param: str, value: LowRank | Tensor) -> Tensor:
    """``vec(P dW Q^T)`` (float64, ``(64,)``) for one parameter's delta."""
    if isinstance(value, LowRank):
        P, Q = projection(param, value.B.shape[0], value.A.shape[1])
        return (value.scale * (P @ value.B.double()) @ (value.A.double() @ Q.T)).reshape(-1)
    dw = value.double().reshape(value.shape[0], -1) if value.dim() else value.double().reshape(1, 1)
    P, Q = projection(param, dw.shape[0], dw.shape[1])
    return (P @ dw @ Q.T).reshape(-1)


def _transposed(value: LowRank | Tensor) -> LowRank | Tensor:
    if isinstance(value, LowRank):
        return LowRank(value.A.T, value.B.T, scale=value.scale)
    return value.reshape(value.shape[0], -1).T


def routing_data(values: Iterable[tuple[str, LowRank | Tensor]], layouts: dict[str, str] | None = None) -> dict[str, Tensor]:
    """The tensors of a library entry's routing file, from ``(parameter name, delta value)``:
    ``prototype.<module path>`` (in,) for every weight of two or more dimensions, and
    ``embedding`` (64,), float32.

    ``layouts`` (module path -> ``"in_out"`` or ``"ids"``) marks weights stored as (in, out)
    (transformers' Conv1D, GPT-2): their input space is the rows, so the prototype is the top
    left-singular vector; and embeddings, whose input is token ids: no prototype.
    """
    out: dict[str, Tensor] = {}
    emb = torch.zeros(EMBEDDING_DIM, dtype=torch.float64)
    for param, value in values:
        emb += layer_sketch(param, value)
        module = param[: -len(".weight")] if param.endswith(".weight") else param
        layout = (layouts or {}).get(module)
        if layout != "ids" and (isinstance(value, LowRank) or value.dim() >= 2):
            out[f"prototype.{module}"] = prototype(_transposed(value) if layout == "in_out" else value).contiguous()
    out["embedding"] = emb.float()
    return out
