"""DeltaLayer: the wrapper that stands in for one target module.

It holds the original module as ``base`` and one delta per adapter name. Its
forward composes the active deltas:

    out = act_n( ... act_1( base_with(W + sum dW_i) + sum residual_j ) ... )

i.e. weight deltas without a fast path are summed into the weight, weight deltas
with a ``residual`` are added to the output, and activation deltas wrap the
result in attach order. Merged deltas live in ``base``'s weights instead.
"""
from __future__ import annotations

import functools
import inspect
from collections.abc import Mapping, Sequence

import torch
from torch import Tensor, nn
from torch.func import functional_call

from .delta import ActivationDelta, Delta, WeightDelta
from .packed import PackedLinear
from .state import ModelState, Routing

__all__ = ["DeltaLayer", "DeltaStateError"]


class DeltaStateError(RuntimeError):
    """An operation does not fit the current merge / activation state."""


class DeltaLayer(nn.Module):
    """Stands in for one target module: the original as ``base``, one delta per adapter.

    It keeps no state of its own about which adapters are active or merged: it reads the
    model's :class:`~deltakit.core.state.ModelState` (persistent) and the per-call context
    (``disabled``, mixed-batch rows). Its only data besides the deltas is the stash of the
    original base parameters while anything is merged, for an exact unmerge.
    """

    def __init__(self, base: nn.Module, state: ModelState):
        super().__init__()
        self.base = base
        self.deltas = nn.ModuleDict()
        object.__setattr__(self, "state", state)  # shared, not a submodule
        # original base parameters while anything is merged (exact unmerge)
        self._original: dict[str, Tensor] | None = None

    @property
    def merged(self) -> list[str]:
        """Names of this layer's adapters merged into ``base``, in merge order."""
        return [n for n in self.state.merged if n in self.deltas]

    def __getattr__(self, name: str):
        try:
            return super().__getattr__(name)
        except AttributeError:
            if name in ("base", "deltas"):
                raise
            return getattr(self._modules["base"], name)

    # ------------------------------------------------------------------ params
    def base_params(self) -> dict[str, Tensor]:
        """The original (unmerged) direct parameters of the base module."""
        if self._original is not None:
            return dict(self._original)
        return {k: p.detach() for k, p in self.base.named_parameters(recurse=False)}

    def weight_delta(self, names: Sequence[str]) -> dict[str, Tensor]:
        """Sum of dense dW of the named (weight) deltas, in fp32, against the original base."""
        base = self.base_params()
        total: dict[str, Tensor] = {}
        for n in names:
            d = self.deltas[n]
            if not isinstance(d, WeightDelta):
                raise DeltaStateError(f"adapter {n!r} on this layer is an activation delta; it has no dW")
            for k, dw in d.delta(base).items():
                dw = dw.float()
                total[k] = total[k] + dw if k in total else dw
        return total

    # ------------------------------------------------------------------ merge
    @torch.no_grad()
    def merge(self, name: str, *, check_finite: bool = True) -> None:
        """Add adapter ``name``'s dW into ``base``; the caller records it in the model state."""
        if name in self.merged:
            raise DeltaStateError(f"adapter {name!r} is already merged")
        d = self.deltas[name]
        if not isinstance(d, WeightDelta):
            raise DeltaStateError(f"adapter {name!r} is an activation delta and cannot be merged into weights")
        if isinstance(self.base, PackedLinear):
            raise DeltaStateError(
                f"adapter {name!r} cannot merge into a {type(self.base).__name__}: its weight is stored packed "
                "(quantised), and W + dW would have to be requantised (lossy, not exactly undoable); keep it "
                "unmerged, or dequantise the base first (deltakit.compress.qbase.dequantize_base)")
        dw = self.weight_delta([name])
        params = dict(self.base.named_parameters(recurse=False))
        new = {}
        for k, delta in dw.items():
            if k not in params:
                raise DeltaStateError(f"delta of {name!r} changes {k!r}, which {type(self.base).__name__} lacks")
            p = params[k]
            val = p.detach().float() + delta.to(p.device)
            if check_finite and not torch.isfinite(val).all():
                raise DeltaStateError(f"merging adapter {name!r} would put NaN/inf into {k!r}; nothing merged")
            new[k] = val.to(p.dtype)
        if self._original is None:
            self._original = {k: p.detach().clone() for k, p in params.items()}
        for k, v in new.items():
            params[k].data.copy_(v)

    @torch.no_grad()
    def restore(self, keep: Sequence[str]) -> None:
        """Set ``base`` to the original parameters plus the dW of ``keep`` (the adapters that
        stay merged); with none, drop the stash. Exact: recomputed from the original."""
        if self._original is None:
            return
        params = dict(self.base.named_parameters(recurse=False))
        if not keep:
            for k, v in self._original.items():
                params[k].data.copy_(v)
            self._original = None
            return
        dw = self.weight_delta(keep)
        for k, v in self._original.items():
            val = v.float() + dw[k].to(v.device) if k in dw else v
            params[k].data.copy_(val.to(v.dtype))

    def drop_original(self) -> None:
        """Forget the unmerge stash (merge-and-detach): the merged weights become the base."""
        self._original = None

    # ------------------------------------------------------------------ forward
    def forward(self, x=None, *args, **kwargs):
        if x is None and not args:
            # The parent called us with the main input by keyword (e.g. Llama's
            # ``self_attn(hidden_states=...)``, ``self.model(input_ids=...)``): move it
            # to the front so deltas always see ``(x, *args, **kwargs)``.
            first = _first_param(self._modules["base"])
            if first in kwargs:
                x = kwargs.pop(first)
        call = self.__dict__["state"].call()
        if call.rows is not None:
            return self._mixed_forward(call.rows, x, *args, **kwargs)
        if call.routing is not None:
            return self._routed_forward(call.routing, x, *args, **kwargs)
        if call.disabled:
            if self.merged:
                raise DeltaStateError(
                    f"adapters {self.merged} are merged into the weights, so a disabled forward would "
                    "not be the base; unmerge them first")
            return self._forward_with([], x, *args, **kwargs)
        return self._forward_with(self.__dict__["state"].live(self._modules["deltas"]), x, *args, **kwargs)

    def _plan(self, names: Sequence[str]) -> tuple[list[str], list[str], list[str]]:
        """``(dense, fast, acts)``: the live deltas by how they apply. Cached per name list, and
        checked against the delta objects themselves, so an attach / detach is never missed."""
        deltas = self._modules["deltas"]
        key = tuple(names)
        objs = tuple(deltas[n] for n in key)
        hit = self.__dict__.setdefault("_plans", {}).get(key)
        if hit is not None and hit[0] == objs:
            return hit[1]
        weight = [n for n in key if isinstance(deltas[n], WeightDelta)]
        plan = ([n for n in weight if deltas[n].residual is None], [n for n in weight if deltas[n].residual is not None],
                [n for n in key if isinstance(deltas[n], ActivationDelta)])
        self._plans[key] = (objs, plan)
        return plan

    def _forward_with(self, names: Sequence[str], x, *args, **kwargs):
        base, deltas = self._modules["base"], self._modules["deltas"]
        dense, fast, acts = self._plan(names)
        if fast and _fold_is_cheaper(base, x):
            dense, fast = dense + fast, []
        if not dense and not acts:  # the common case (nothing live, or the LoRA family): no closures
            out = base(x, *args, **kwargs)
            for n in fast:
                out = out + deltas[n].residual(base, x).to(out.dtype)
            return out

        def inner(x, *args, **kwargs):
            if dense:
                # every delta sees the original parameters; sums run in fp32 and are cast once,
                # so a half-precision W + (P - W) gives back P exactly (modules_to_save heads)
                base = {k: p for k, p in self.base.named_parameters(recurse=False)}
                acc: dict[str, Tensor] = {}
                for n in dense:
                    for k, dw in self.deltas[n].delta(base).items():
                        acc[k] = (acc[k] if k in acc else base[k].float()) + dw.float()
                params = {k: acc[k].to(base[k].dtype) if k in acc else p for k, p in base.items()}
                out = functional_call(self.base, params, (x, *args), kwargs)
            else:
                out = self.base(x, *args, **kwargs)
            for n in fast:
                out = out + self.deltas[n].residual(self.base, x).to(out.dtype)
            return out

        fn = inner
        for n in acts:
            fn = _wrap(self.deltas[n], fn)
        return fn(x, *args, **kwargs)

    def _mixed_forward(self, rows, x, *args, **kwargs):
        names, idx = rows
        host_idx = idx  # mixed_batch builds it on the host
        if self.merged:
            raise DeltaStateError(f"a mixed batch needs unmerged adapters; {self.merged} are merged")
        lead = x if isinstance(x, Tensor) else next(
            (v for v in (*args, *kwargs.values()) if isinstance(v, Tensor) and v.dim() > 0), None)
        if lead is None:
            raise DeltaStateError("a mixed batch needs a tensor input with a batch dimension")
        idx = idx.to(lead.device)
        if isinstance(x, Tensor) and x is lead and x.shape[0] == 1 and idx.shape[0] > 1:
            # an input shared by every row (e.g. position ids of shape (1, T)): give each row its copy
            x = lead = x.expand(idx.shape[0], *x.shape[1:])
        if idx.shape[0] != lead.shape[0]:
            raise DeltaStateError(f"mixed batch names {idx.shape[0]} rows, the input has {lead.shape[0]}")
        present = [n for n in names if n in self.deltas]
        if not present:  # none of the batch's adapters touch this layer
            return self.base(x, *args, **kwargs)
        # map the batch's adapter indices to this layer's deltas (-1 where absent here)
        local = torch.tensor([present.index(n) if n in present else -1 for n in names] + [-1])
        # idx == -1 picks the trailing -1. The host copy lets a batched kernel plan its rows
        # without a device sync (LoRA's mixed_residual reads it with .tolist()).
        host_row = local[host_idx.to(local.device)]
        row = host_row.to(lead.device)
        classes = {type(self.deltas[n]) for n in present}
        if len(classes) == 1:
            cls = classes.pop()
            if isinstance(self.deltas[present[0]], ActivationDelta) and cls.mixed_forward is not None:
                return cls.mixed_forward(self.base, [self.deltas[n] for n in present], row, x, *args, **kwargs)
            if cls.mixed_residual is not None and not (self.training and _has_dropout(self, present)):
                # the base output goes in so the kernel can add into it in place
                return cls.mixed_residual(self.base, [self.deltas[n] for n in present], host_row, x,
                                          into=self.base(x, *args, **kwargs))
        # Fallback for methods without a batched path: one sub-batch per adapter present.
        out = None
        for k in [-1, *range(len(present))]:
            sel = (row == k).nonzero(as_tuple=True)[0]
            if sel.numel() == 0:
                continue
            sub = [present[k]] if k >= 0 else []
            a, kw = _take_rows((x, *args), kwargs, sel, x.shape[0])
            y = self._forward_with(sub, *a, **kw)
            if out is None:
                out = y.new_zeros((x.shape[0], *y.shape[1:]))
            out[sel] = y
        return out


    def _routed_forward(self, routing: Routing, x, *args, **kwargs):
        """Soft weights over adapters: ``base(x) + sum_k w_k * (change adapter k makes)``.

        An adapter this layer lacks contributes zero. The LoRA family runs in one batched pass
        (any mix of ranks); other methods run once per adapter and their output changes are
        summed with the weights, which for a weight delta is exactly the weighted sum of dW.
        """
        if self.merged:
            raise DeltaStateError(f"routing needs unmerged adapters; {self.merged} are merged")
        deltas = self._modules["deltas"]
        cols = [i for i, n in enumerate(routing.names) if n in deltas]
        if not cols:
            return self.base(x, *args, **kwargs)
        w = routing.weights(self, x) if callable(routing.weights) else routing.weights
        w = _layer_weights(w, cols, routing, x)
        names = [routing.names[i] for i in cols]
        present = [deltas[n] for n in names]
        classes = {type(d) for d in present}
        cls = next(iter(classes))
        if len(classes) == 1 and cls.routed_residual is not None and not (self.training and _has_dropout(self, names)):
            out = self.base(x, *args, **kwargs)
            return out + cls.routed_residual(self.base, present, w, x, routing.heads).to(out.dtype)
        if routing.heads != 1:
            raise DeltaStateError(f"multi-head routing needs LoRA-family adapters; this layer has {sorted(c.__name__ for c in classes)}")
        y0 = self._forward_with([], x, *args, **kwargs)
        out = y0
        for j, n in enumerate(names):
            yj = self._forward_with([n], x, *args, **kwargs)
            if yj.shape != y0.shape:
                raise DeltaStateError(f"adapter {n!r} changes this layer's output shape; it cannot be routed softly")
            wj = w[..., j].to(y0.dtype)
            out = out + (yj - y0) * wj.reshape(*wj.shape, *([1] * (y0.dim() - wj.dim())))
        return out


def _first_param(module: nn.Module) -> str | None:
    """Name of the first parameter of ``module.forward`` (its main input)."""
    return _first_param_of(type(module))


@functools.lru_cache(maxsize=None)
def _first_param_of(cls: type) -> str | None:
    # per class, since Llama-style keyword calls reach this on every forward
    for p in list(inspect.signature(cls.forward).parameters.values())[1:]:  # skip self
        if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD):
            return p.name
    return None


def _fold_is_cheaper(base: nn.Module, x) -> bool:
    """Without autograd, adding dW into W once beats the low-rank branch over many tokens.

    The residual path costs two skinny matmuls over every token (inner dim r, which CPU
    BLAS runs far below peak) plus a full-size add; folding costs one ``r * in * out``
    product and one pass over W. Fold when there are more tokens than W has columns
    per row of both sides (tokens * (in + out) > in * out). Training keeps the factored
    path: folding would make autograd form the full weight gradient LoRA exists to avoid.
    """
    if torch.is_grad_enabled() or not isinstance(x, Tensor) or not x.is_floating_point():
        return False
    w = getattr(base, "weight", None)
    if not isinstance(w, Tensor) or w.dim() != 2 or isinstance(base, nn.Embedding):
        return False
    tokens = x.numel() // max(x.shape[-1], 1)
    return tokens * (w.shape[0] + w.shape[1]) > w.numel()


def _layer_weights(w, cols: list[int], routing: Routing, x) -> Tensor:
    """This layer's columns of the routing weights, checked against ``x``'s leading dims."""
    k_axis = -1 if routing.heads == 1 else -2
    if not isinstance(w, Tensor) or w.dim() < 1 - k_axis or w.shape[k_axis] != len(routing.names):
        found = tuple(w.shape) if isinstance(w, Tensor) else type(w).__name__
        raise DeltaStateError(f"routing weights must be (B[, T], {len(routing.names)}"
                              f"{'' if routing.heads == 1 else f', {routing.heads}'}); got {found}")
    lead = w.shape[:k_axis] if routing.heads == 1 else w.shape[:-2]
    xs = tuple(x.shape) if isinstance(x, Tensor) else ()
    if len(lead) > len(xs) or any(a != b and a != 1 for a, b in zip(lead, xs)):
        raise DeltaStateError(f"routing weights lead with {tuple(lead)}, the layer's input is {xs}")
    if len(cols) < len(routing.names):
        w = w.index_select(w.dim() + k_axis, torch.tensor(cols, device=w.device))
    return w.to(x.device) if isinstance(x, Tensor) else w


def _wrap(delta: ActivationDelta, inner):
    def fn(x, *args, **kwargs):
        return delta(inner, x, *args, **kwargs)
    return fn


def _has_dropout(layer: DeltaLayer, names: Sequence[str]) -> bool:
    return any(isinstance(m, nn.Dropout) and m.p > 0 for n in names for m in layer.deltas[n].modules())


def _take_rows(args: tuple, kwargs: Mapping, sel: Tensor, batch: int):
    def take(v):
        return v.index_select(0, sel) if isinstance(v, Tensor) and v.dim() > 0 and v.shape[0] == batch else v
    return tuple(take(a) for a in args), {k: take(v) for k, v in kwargs.items()}


def is_delta(module: nn.Module) -> bool:
    return isinstance(module, Delta)
