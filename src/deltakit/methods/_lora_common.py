"""Pieces shared by the LoRA variants (LoRA-FA, Tied-LoRA, AdaLoRA, IncreLoRA).

* :func:`seeded_init` - a frozen random factor regenerated from ``(seed, key)`` so it
  never has to be stored in the adapter file.
* :class:`SVDLoRA` - the SVD-form update ``dW = s * P diag(lambda * mask) Q`` of
  AdaLoRA / IncreLoRA with a per-component state buffer (pre-allocated rank, static
  shapes, so the optimiser state and the file layout never change shape).
* :class:`Sensitivity` - AdaLoRA's smoothed importance ``I_bar * U_bar`` of every
  parameter, fed by gradient hooks, so it works with training loops that clear the
  gradients before calling ``on_step``.
"""
from __future__ import annotations

import math
from collections.abc import Iterator, Mapping

import torch
from torch import Tensor, nn

from ..core.adapter import Adapter
from ..core.delta import BuildContext, WeightDelta, param_dtype
from ..core.registry import ConfigError
from ..core.seeding import generator
from ._base_ops import Conv1D, in_out
from .lora import _cast

__all__ = ["seeded_init", "SVDLoRA", "Sensitivity", "svd_deltas", "orthogonal_regularizer", "rank_states",
           "load_rank_states", "OFF", "RESERVE", "ON"]


def seeded_init(shape: tuple[int, ...], init: str, seed: int, key: str, *,
                device: torch.device | str | None = None, dtype: torch.dtype = torch.float32) -> Tensor:
    """A random tensor that depends only on ``(seed, key, shape, init)``.

    Drawn on CPU with its own generator (independent of the global RNG and of the
    device), then moved; ``key`` (a module path or a shape tag) decorrelates targets.
    """
    g = generator(seed, key, scheme="path")
    t = torch.empty(shape, dtype=torch.float32)
    if init == "kaiming":
        nn.init.kaiming_uniform_(t, a=math.sqrt(5), generator=g)
    elif init == "gaussian":
        nn.init.normal_(t, std=1.0 / shape[0], generator=g)
    elif init == "orthogonal":
        nn.init.orthogonal_(t.view(shape[0], -1), generator=g)
    else:
        raise ConfigError(f"random init: expected one of ['kaiming', 'gaussian', 'orthogonal'], found {init!r}")
    return t.to(device=device, dtype=dtype)


# component states of an SVD-form delta (stored as an int8 buffer)
OFF, RESERVE, ON = 0, 1, 2


class SVDLoRA(WeightDelta):
    """``dW = s * lora_B @ diag(lambda_eff) @ lora_A`` with a static, pre-allocated rank.

    Shapes: lora_A (Q) (r, in), lora_E (lambda) (r,), lora_B (P) (out, r), state (r,) int8.
    ``lambda_eff = lora_E`` where state == ON, ``reserve_value`` where state == RESERVE
    (IncreLoRA's advance learning: P and Q train at a tiny fixed lambda before the
    component is switched on), 0 where OFF. Masked components get no gradient.
    Not registered itself; AdaLoRA and IncreLoRA subclass it.
    """

    supported = (nn.Linear, Conv1D)
    reserve_value: float = 0.0

    def __init__(self, base: nn.Module, r: int, alpha: float, dropout: float, init_on: int,
                 ctx: BuildContext | None, adapter_dtype: str | None):
        super().__init__()
        dev = next(base.parameters()).device
        dtype = param_dtype(base, adapter_dtype)
        fan_in, fan_out = in_out(base)
        self.layout = "conv1d" if isinstance(base, Conv1D) else "linear"
        self.r = r
        # alpha / r with r the allocated rank, fixed for the whole run (as peft's
        # AdaLoRA), so switching components on or off never rescales the others.
        self.scale = alpha / r
        # AdaLoRA sec. 3.1: lambda starts at zero, P and Q random Gaussian (peft: std 0.02).
        self.lora_A = nn.Parameter(torch.randn(r, fan_in, device=dev, dtype=dtype) * 0.02)
        self.lora_E = nn.Parameter(torch.zeros(r, device=dev, dtype=dtype))
        self.lora_B = nn.Parameter(torch.randn(fan_out, r, device=dev, dtype=dtype) * 0.02)
        state = torch.full((r,), OFF, dtype=torch.int8, device=dev)
        state[:init_on] = ON
        self.register_buffer("state", state)
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()

    def lam(self) -> Tensor:
        """Effective singular values (r,): trained where ON, fixed where RESERVE, 0 where OFF."""
        on = (self.state == ON).to(self.lora_E.dtype)
        res = (self.state == RESERVE).to(self.lora_E.dtype) * self.reserve_value
        return self.lora_E * on + res

    def rank(self) -> int:
        return int((self.state == ON).sum())

    def delta(self, base: Mapping[str, Tensor]) -> dict[str, Tensor]:
        dw = (self.lora_B * self.lam()) @ self.lora_A * self.scale    # (out, in)
        return {"weight": dw.t() if self.layout == "conv1d" else dw}

    def factors(self) -> tuple[Tensor, Tensor, float, tuple[int, ...]]:
        """``(B', A', s, shape)`` with ``dW = s B' @ A'`` in the weight's layout (task vectors)."""
        P = self.lora_B * self.lam()                                  # (out, r)
        if self.layout == "conv1d":
            return self.lora_A.t(), P.t(), self.scale, (self.lora_A.shape[1], P.shape[0])
        return P, self.lora_A, self.scale, (P.shape[0], self.lora_A.shape[1])

    def residual(self, base: nn.Module, x: Tensor) -> Tensor:
        h = self.dropout(_cast(x, self.lora_A)) @ self.lora_A.t()     # (..., r)
        return (h * (self.lam() * self.scale)) @ self.lora_B.t()      # (..., out)

    def orthogonality(self) -> Tensor:
        """``||P^T P - I||_F^2 + ||Q Q^T - I||_F^2`` (AdaLoRA eq. 4) over all r components."""
        P, Q = self.lora_B, self.lora_A
        eye = torch.eye(self.r, device=P.device, dtype=P.dtype)
        return (P.t() @ P - eye).pow(2).sum() + (Q @ Q.t() - eye).pow(2).sum()


def svd_deltas(adapter: Adapter) -> Iterator[tuple[str, SVDLoRA]]:
    for path, d in adapter.deltas():
        if isinstance(d, SVDLoRA):
            yield path, d


class Sensitivity:
    """AdaLoRA's smoothed sensitivity of each parameter (eqs. 8-10).

        I(w) = |w * dL/dw|,  I_bar = b1 I_bar + (1 - b1) I,  U_bar = b2 U_bar + (1 - b2) |I - I_bar|,
        s(w) = I_bar * U_bar

    ``I`` is taken in a post-accumulate-grad hook (the weights the gradient was
    computed at; with gradient accumulation the last call holds the full sum), and
    folded into the EMAs by :meth:`update` once per optimizer step.
    """

    def __init__(self, params: Mapping[str, nn.Parameter], beta1: float, beta2: float):
        if not (0 < beta1 < 1 and 0 < beta2 < 1):
            raise ConfigError(f"sensitivity EMA: expected 0 < beta1, beta2 < 1, found {beta1}, {beta2}")
        self.beta1, self.beta2 = beta1, beta2
        self.params = dict(params)
        self._last: dict[str, Tensor] = {}
        self.i_bar: dict[str, Tensor] = {}
        self.u_bar: dict[str, Tensor] = {}
        self._handles = [p.register_post_accumulate_grad_hook(self._hook(k)) for k, p in self.params.items()]

    def _hook(self, key: str):
        def hook(p: Tensor) -> None:
            if p.grad is not None:
                self._last[key] = (p.detach() * p.grad.detach()).abs().float()
        return hook

    @torch.no_grad()
    def update(self) -> bool:
        """Fold the last step's ``I`` into the EMAs; False if no gradient was seen."""
        if not self._last:
            return False
        for k, i in self._last.items():
            if k not in self.i_bar:
                self.i_bar[k] = torch.zeros_like(i)
                self.u_bar[k] = torch.zeros_like(i)
            self.i_bar[k].mul_(self.beta1).add_(i, alpha=1 - self.beta1)
            self.u_bar[k].mul_(self.beta2).add_((i - self.i_bar[k]).abs(), alpha=1 - self.beta2)
        self._last = {}
        return True

    def score(self, key: str) -> Tensor:
        if key not in self.i_bar:
            return torch.zeros_like(self.params[key], dtype=torch.float32)
        return self.i_bar[key] * self.u_bar[key]

    def close(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles = []

    def state_dict(self) -> dict[str, Tensor]:
        """The EMAs (and an ``I`` not yet folded in), keyed ``"i_bar/<param>"`` etc., for checkpoints."""
        return {f"{part}/{k}": t for part, d in (("i_bar", self.i_bar), ("u_bar", self.u_bar), ("last", self._last))
                for k, t in d.items()}

    def load_state_dict(self, state: Mapping[str, Tensor]) -> None:
        """Restore :meth:`state_dict`; every key must name one of the watched parameters."""
        parts: dict[str, dict[str, Tensor]] = {"i_bar": {}, "u_bar": {}, "last": {}}
        for key, t in state.items():
            part, _, name = key.partition("/")
            if part not in parts or name not in self.params:
                raise ValueError(f"sensitivity state: expected keys '<i_bar|u_bar|last>/<parameter>' of the "
                                 f"{len(self.params)} watched parameters, found {key!r}")
            parts[part][name] = t.to(self.params[name].device, torch.float32)
        self.i_bar, self.u_bar, self._last = parts["i_bar"], parts["u_bar"], parts["last"]


def rank_states(deltas: Mapping[str, SVDLoRA]) -> dict[str, Tensor]:
    """Each target's component ``state`` buffer as ``"state/<path>"``: the rank pattern a budget
    callback has set, which is a buffer, not a trainable parameter, so a checkpoint of the
    parameters alone would lose it."""
    return {f"state/{p}": d.state for p, d in deltas.items()}


@torch.no_grad()
def load_rank_states(deltas: Mapping[str, SVDLoRA], state: Mapping[str, Tensor], who: str) -> None:
    """Copy :func:`rank_states` back into the buffers, after checking every target is there with its shape."""
    want = {f"state/{p}" for p in deltas}
    got = {k for k in state if k.startswith("state/")}
    if want != got:
        raise ValueError(f"{who}: expected the rank states of targets {sorted(want)[:3]}..., found "
                         f"missing={sorted(want - got)[:3]} unexpected={sorted(got - want)[:3]}")
    for p, d in deltas.items():
        t = state[f"state/{p}"]
        if t.shape != d.state.shape:
            raise ValueError(f"{who}: expected the rank state of {p} of shape {tuple(d.state.shape)}, "
                             f"found {tuple(t.shape)}")
        d.state.copy_(t)


def orthogonal_regularizer(model: nn.Module, name: str | None = None) -> Tensor:
    """``gamma * sum_k (||P_k^T P_k - I||_F^2 + ||Q_k Q_k^T - I||_F^2)`` (AdaLoRA eq. 4).

    Summed over the SVD-form deltas (AdaLoRA, IncreLoRA) of adapter ``name``, or of
    every active adapter that has them; ``gamma`` is each adapter's ``orth_reg_weight``.
    Add it to the task loss before ``backward``.
    """
    from ..core.adapter import active, adapters

    ads = adapters(model)
    names = [name] if name is not None else active(model)
    if name is not None and name not in ads:
        raise KeyError(f"no adapter named {name!r} on this model; attached: {sorted(ads)}")
    total: Tensor | None = None
    for n in names:
        gamma = getattr(ads[n].config, "orth_reg_weight", 0.0)
        for _, d in svd_deltas(ads[n]):
            term = gamma * d.orthogonality()
            total = term if total is None else total + term
    if total is None:
        p = next(model.parameters())
        return p.new_zeros(())
    return total
