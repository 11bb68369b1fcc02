"""Adapters: named sets of deltas on a model, and the operations over them.

>>> import torch, deltakit as dk
>>> model = torch.nn.Sequential(torch.nn.Linear(4, 4))
>>> ad = dk.attach(model, dk.LoraConfig(r=2, targets=["0"]), name="task")
>>> ad.num_parameters()
16
>>> dk.detach(model, "task")
"""
from __future__ import annotations

import contextlib
from collections.abc import Iterator, Mapping, Sequence

import torch
from torch import Tensor, nn

from .delta import BuildContext, Delta, WeightDelta, drop_caches
from .full import FullConfig, FullDelta
from .layer import DeltaLayer, DeltaStateError
from .registry import DeltaConfig, MethodSpec, get_method
from .state import ModelState, Routing, call_scope
from .targets import TargetError, default_targets, layer_index, select_targets

__all__ = [
    "Adapter", "attach", "detach", "adapters", "get_adapter", "set_active", "active",
    "disabled", "mixed_batch", "routed", "param_counts", "merge_and_detach", "model_state",
]

_STATE_ATTR = "_deltakit_state"
SHARED = "deltakit_shared"


class Adapter:
    """A named set of deltas on one model, plus the config that made them.

    Created by :func:`attach` or :func:`deltakit.load_adapter`; not directly.
    """

    def __init__(self, model: nn.Module, name: str, config: DeltaConfig, spec: MethodSpec,
                 targets: dict[str, str], shared: nn.Module | None):
        self.model = model
        self.name = name
        self.config = config
        self.spec = spec
        #: target path -> method name used there ("full" for modules_to_save)
        self.targets = targets
        self.shared = shared

    def __repr__(self) -> str:
        return (f"Adapter(name={self.name!r}, method={self.spec.name!r}, targets={len(self.targets)}, "
                f"params={self.num_parameters():,})")

    # ---------------------------------------------------------------- access
    def layers(self, include_full: bool = False) -> Iterator[tuple[str, DeltaLayer]]:
        """``(path, DeltaLayer)`` for the method's targets; ``include_full`` adds ``modules_to_save``."""
        for path, method in self.targets.items():
            if not include_full and method != self.spec.name:
                continue
            layer = self.model.get_submodule(path)
            assert isinstance(layer, DeltaLayer), path
            yield path, layer

    def deltas(self, include_full: bool = False) -> Iterator[tuple[str, Delta]]:
        """``(path, delta)`` of the method's own deltas; ``include_full`` adds the
        ``modules_to_save`` copies (:class:`~deltakit.methods.full.FullDelta`)."""
        for path, layer in self.layers(include_full):
            yield path, layer.deltas[self.name]

    def named_parameters(self) -> Iterator[tuple[str, nn.Parameter]]:
        """Every parameter the adapter owns, each once (shared ones under ``deltakit_shared.``)."""
        seen: set[int] = set()
        if self.shared is not None:
            for k, p in self.shared.named_parameters():
                seen.add(id(p))
                yield f"{SHARED}.{k}", p
        for path, d in self.deltas(include_full=True):
            for k, p in d.named_parameters():
                if id(p) not in seen:
                    seen.add(id(p))
                    yield f"{path}.{k}", p

    def parameters(self) -> Iterator[nn.Parameter]:
        for _, p in self.named_parameters():
            yield p

    def num_parameters(self, trainable_only: bool = False) -> int:
        return sum(p.numel() for p in self.parameters() if p.requires_grad or not trainable_only)

    def state_dict(self) -> dict[str, Tensor]:
        """Everything needed to rebuild the adapter: parameters and persistent buffers."""
        out: dict[str, Tensor] = {}
        if self.shared is not None:
            out.update({f"{SHARED}.{k}": v for k, v in self.shared.state_dict().items()})
        for path, d in self.deltas(include_full=True):
            out.update({f"{path}.{k}": v for k, v in d.state_dict().items()})
        return out

    # ---------------------------------------------------------------- state changes
    @property
    def state(self) -> ModelState:
        return _require_state(self.model)

    @property
    def merged(self) -> bool:
        return self.name in self.state.merged

    def merge(self) -> None:
        """Add every weight delta's dW into the base weights (exactly reversible); all or nothing."""
        state = self.state
        with state.changing():
            if self.merged:
                raise DeltaStateError(f"adapter {self.name!r} is already merged")
            layers = list(self.layers(include_full=True))
            acts = sorted({type(layer.deltas[self.name]).__name__ for _, layer in layers
                           if not isinstance(layer.deltas[self.name], WeightDelta)})
            if acts:
                raise DeltaStateError(f"adapter {self.name!r} has activation deltas ({', '.join(acts)}) "
                                      "that cannot be merged into weights")
            done: list[DeltaLayer] = []
            try:
                for _, layer in layers:
                    layer.merge(self.name)
                    done.append(layer)
            except Exception:
                for layer in done:
                    layer.restore(layer.merged)
                raise
            state.merged = (*state.merged, self.name)

    def unmerge(self) -> None:
        """Take this adapter's dW out of the base weights, exactly (recomputed from the originals)."""
        state = self.state
        with state.changing():
            if not self.merged:
                raise DeltaStateError(f"adapter {self.name!r} is not merged")
            state.merged = tuple(n for n in state.merged if n != self.name)
            for _, layer in self.layers(include_full=True):
                layer.restore(layer.merged)

    def detach(self) -> None:
        detach(self.model, self.name)

    def training_hooks(self, *, loader=None, total_steps: int | None = None) -> tuple[dict | None, list]:
        """``(params, callbacks)`` this adapter's method needs from :func:`deltakit.fit`
        (rank budgets, layer sampling, data-driven masks); ``(None, [])`` for most methods."""
        return self.spec.cls.training_hooks(self, loader=loader, total_steps=total_steps)

    def delta_weights(self) -> Iterator[tuple[str, Tensor]]:
        """``(parameter path, dense dW)`` for every weight delta, one target at a time."""
        for path, layer in self.layers(include_full=True):
            for k, dw in layer.weight_delta([self.name]).items():
                yield f"{path}.{k}", dw


# -------------------------------------------------------------------- model level
def model_state(model: nn.Module) -> ModelState | None:
    """The model's adapter state (None before the first attach)."""
    return getattr(model, _STATE_ATTR, None)


def _require_state(model: nn.Module) -> ModelState:
    state = model_state(model)
    if state is None:
        raise DeltaStateError(f"no adapters are attached to this {type(model).__name__}")
    return state


def adapters(model: nn.Module) -> dict[str, Adapter]:
    """The adapters attached to ``model``, by name, in attach order."""
    state = model_state(model)
    return dict(state.adapters) if state is not None else {}


def get_adapter(model: nn.Module, name: str) -> Adapter:
    ads = adapters(model)
    if name not in ads:
        raise KeyError(f"no adapter named {name!r} on this model; attached: {sorted(ads)}")
    return ads[name]


def _layers(model: nn.Module) -> Iterator[DeltaLayer]:
    for m in model.modules():
        if isinstance(m, DeltaLayer):
            yield m


def _resolve_targets(model: nn.Module, config: DeltaConfig, spec: MethodSpec) -> list[str]:
    targets = config.targets
    if targets is None:
        targets = default_targets(model, getattr(spec.cls, "default_targets", None))
    names = select_targets(model, targets, types=config.target_types, layers=config.layers,
                           exclude=config.exclude)
    wrong = [(n, type(_unwrap(model.get_submodule(n))).__name__) for n in names
             if not spec.cls.supports(_unwrap(model.get_submodule(n)))]
    if wrong and config.target_types is None and config.targets is not None:
        n, t = wrong[0]
        sup = ", ".join(c.__name__ for c in spec.cls.supported)
        what = f"supports {sup}" if sup else "cannot attach to this kind of module"
        raise TargetError(f"method {spec.name!r} {what}; target {n!r} is a {t} "
                          f"({len(wrong)} unsupported target(s)); narrow targets or set target_types")
    kept = [n for n in names if n not in {w for w, _ in wrong}]
    if not kept:
        raise TargetError(f"method {spec.name!r} can attach to none of the {len(names)} matched modules "
                          f"(e.g. {names[0]!r}, a {wrong[0][1]})")
    _check_tied(model, kept + list(config.modules_to_save and select_targets(model, config.modules_to_save)))
    return kept


def _check_tied(model: nn.Module, paths: Sequence[str]) -> None:
    """Refuse targets whose parameters other modules also use (tied weights): an unmerged
    delta would reach one user, a merged one all of them."""
    owners: dict[int, list[tuple[str, nn.Module]]] = {}
    for mpath, module in model.named_modules(remove_duplicate=False):
        if isinstance(module, DeltaLayer):
            continue
        for k, p in module.named_parameters(recurse=False):
            owners.setdefault(id(p), []).append((mpath, module))
    for path in paths:
        base = _unwrap(model.get_submodule(path))
        for k, p in base.named_parameters(recurse=False):
            # the target itself, seen through the ".base" of its own and its parents' DeltaLayers
            # (a target inside another target: q/v projections of an attention module with prefixes)
            others = [o for o, m in owners.get(id(p), []) if not (m is base and _no_base(o) == _no_base(path))]
            if others:
                raise TargetError(f"target {path}.{k} is tied to {others[0]} (shared weights): a delta on one "
                                  "user would reach the other only once merged; untie them or pick another target")


def _no_base(path: str) -> str:
    return ".".join(part for part in path.split(".") if part != "base")


def _unwrap(m: nn.Module) -> nn.Module:
    return m.base if isinstance(m, DeltaLayer) else m


def attach(model: nn.Module, config: DeltaConfig, name: str = "default", *,
           activate: bool = True) -> Adapter:
    """Attach a new adapter built from ``config``; freezes the base.

    All deltas are built before the model is touched, so a failure leaves the
    model unchanged. With ``activate`` the new adapter becomes the only active one.
    """
    if not isinstance(config, DeltaConfig):
        raise TypeError(f"expected a method config (e.g. LoraConfig), found {type(config).__name__}")
    if not name or "." in name:
        raise ValueError(f"adapter name must be non-empty without '.', found {name!r}")
    if name in adapters(model):
        raise ValueError(f"an adapter named {name!r} is already attached; detach it or pick another name")
    spec = get_method(config.method)
    paths = _resolve_targets(model, config, spec)
    full_paths = select_targets(model, config.modules_to_save) if config.modules_to_save else []
    overlap = set(paths) & set(full_paths)
    if overlap and config.targets is None:  # default targets yield to an explicit modules_to_save
        paths, overlap = [p for p in paths if p not in overlap], set()
    if overlap:
        raise TargetError(f"modules {sorted(overlap)} are both targets and modules_to_save")
    built = build_deltas(model, config, spec, paths, full_paths)
    return insert(model, name, config, spec, built, activate=activate)


def build_deltas(model: nn.Module, config: DeltaConfig, spec: MethodSpec, paths: Sequence[str],
                 full_paths: Sequence[str] = ()):
    """Build (without inserting) the shared module and one delta per target."""
    bases = {p: _unwrap(model.get_submodule(p)) for p in paths}
    shared = spec.cls.build_shared(config, bases)
    deltas: dict[str, tuple[str, Delta]] = {}
    for i, (p, base) in enumerate(bases.items()):
        ctx = BuildContext(p, layer_index(p), shared, i)
        deltas[p] = (spec.name, spec.cls(base, config, ctx))
    full_cfg = FullConfig(adapter_dtype=config.adapter_dtype)
    for i, p in enumerate(full_paths):
        base = _unwrap(model.get_submodule(p))
        deltas[p] = ("full", FullDelta(base, full_cfg, BuildContext(p, layer_index(p), None, i)))
    return shared, deltas


def insert(model: nn.Module, name: str, config: DeltaConfig, spec: MethodSpec, built, *,
           activate: bool = True) -> Adapter:
    """Put built deltas into ``model`` under ``name`` (see :func:`build_deltas`); freezes the base."""
    shared, deltas = built
    state = model_state(model)
    if state is None:
        state = ModelState(requires_grad={k: p.requires_grad for k, p in model.named_parameters()})
        for p in model.parameters():
            p.requires_grad_(False)
        state.install(model)
        object.__setattr__(model, _STATE_ATTR, state)
    with state.changing():
        for path, (_, delta) in deltas.items():
            module = model.get_submodule(path)
            if not isinstance(module, DeltaLayer):
                module = DeltaLayer(module, state)
                _set_submodule(model, path, module)
            module.deltas[name] = delta
        if shared is not None:
            # Shared parameters live once, beside the adapter's first delta (not on the root:
            # containers like nn.Sequential call every child of the root).
            home = model.get_submodule(next(iter(deltas)))
            if "shared" not in home._modules:
                home.add_module("shared", nn.ModuleDict())
            home._modules["shared"][name] = shared
        adapter = Adapter(model, name, config, spec, {p: m for p, (m, _) in deltas.items()}, shared)
        state.adapters = {**state.adapters, name: adapter}
        if activate:
            state.active = (name,)
    return adapter


def _set_submodule(model: nn.Module, path: str, module: nn.Module) -> None:
    parent, _, leaf = path.rpartition(".")
    # A parent that is itself a target (an attention module wrapped for prefixes, whose q/v
    # projections carry LoRA) is a DeltaLayer: the child belongs to its base, which is what runs.
    setattr(_unwrap(model.get_submodule(parent)) if parent else model, leaf, module)


def detach(model: nn.Module, name: str) -> None:
    """Remove adapter ``name`` (unmerging it first); when the last one goes, the original
    module tree and ``requires_grad`` flags come back."""
    adapter = get_adapter(model, name)
    state = adapter.state
    with state.changing():
        if adapter.merged:
            adapter.unmerge()
        for path, layer in list(adapter.layers(include_full=True)):
            del layer.deltas[name]
            drop_caches(layer.base)  # stacked factors may still hold this adapter's tensors
            home = layer._modules.get("shared")
            if home is not None and name in home:
                del home[name]
            if len(layer.deltas) == 0:
                _set_submodule(model, path, layer.base)
        state.adapters = {k: v for k, v in state.adapters.items() if k != name}
        state.active = tuple(n for n in state.active if n != name)
        if not state.adapters:
            for k, p in model.named_parameters():
                p.requires_grad_(state.requires_grad.get(k, p.requires_grad))
            state.uninstall(model)
            object.__delattr__(model, _STATE_ATTR)


def merge_and_detach(model: nn.Module, names: Sequence[str] | None = None) -> nn.Module:
    """Merge the named adapters (default: the active ones) for good and remove all adapters.

    Returns the same model object, now a plain model whose weights include the deltas.
    """
    state = _require_state(model)
    with state.changing():
        names = list(names) if names is not None else list(state.active)
        for n in names:
            if not get_adapter(model, n).merged:
                get_adapter(model, n).merge()
        for layer in _layers(model):
            layer.drop_original()
        state.merged = ()
        for n in list(state.adapters):
            detach(model, n)
    return model


def active(model: nn.Module) -> list[str]:
    state = model_state(model)
    return list(state.active) if state is not None else []


def set_active(model: nn.Module, names: Sequence[str] | str) -> None:
    """Make exactly ``names`` the active adapters (their deltas compose)."""
    names = [names] if isinstance(names, str) else list(names)
    known = adapters(model)
    missing = [n for n in names if n not in known]
    if missing:
        raise KeyError(f"no adapter(s) {missing} on this model; attached: {sorted(known)}")
    if known:
        state = _require_state(model)
        with state.changing():
            state.active = tuple(dict.fromkeys(names))


@contextlib.contextmanager
def disabled(model: nn.Module) -> Iterator[None]:
    """Within the block the model computes its base function (no unmerged delta applies).

    Per call: only this thread / context sees it, and nested blocks restore the outer one.
    """
    state = model_state(model)
    if state is None:
        yield
        return
    with call_scope(state, disabled=True):
        yield


@contextlib.contextmanager
def mixed_batch(model: nn.Module, rows: Sequence[str | None]) -> Iterator[None]:
    """Within the block, batch row ``i`` runs with adapter ``rows[i]`` (None: the base).

    Methods with a batched path (LoRA) compute all rows in one pass per layer. Per call:
    threads running mixed batches on one model at once each see their own rows.
    """
    known = adapters(model)
    names = tuple(dict.fromkeys(r for r in rows if r is not None))
    missing = [n for n in names if n not in known]
    if missing:
        raise KeyError(f"mixed batch names unknown adapter(s) {missing}; attached: {sorted(known)}")
    idx = torch.tensor([names.index(r) if r is not None else -1 for r in rows], dtype=torch.long)
    state = model_state(model)
    if state is None:  # no adapters at all: every row is the base
        yield
        return
    with call_scope(state, rows=(names, idx)):
        yield


@contextlib.contextmanager
def routed(model: nn.Module, names: Sequence[str], weights, *, heads: int = 1) -> Iterator[None]:
    """Within the block, every row (or token) mixes adapters ``names`` with soft weights.

    ``weights``: ``(B, K)`` per row, ``(B, T, K)`` per token (K = len(names); a trailing
    ``heads`` axis for multi-head routing), or a callable ``fn(layer, x)`` returning such a
    tensor from a layer's input (per-layer routers: Arrow). Layer output:
    ``base(x) + sum_k w_k * delta_k(x)``; a layer that adapter k does not target contributes
    zero for it. LoRA-family adapters of any mix of ranks run in one batched pass per layer.
    Gradients flow into the weights (learned routers). Per call, like :func:`mixed_batch`.
    """
    names = tuple(names)
    known = adapters(model)
    missing = [n for n in names if n not in known]
    if missing or not names:
        raise KeyError(f"routing needs attached adapters; unknown: {missing or 'no names given'}, attached: {sorted(known)}")
    if len(set(names)) != len(names):
        raise ValueError(f"routing names an adapter twice: {list(names)}")
    if heads < 1:
        raise ValueError(f"heads must be >= 1, got {heads}")
    if isinstance(weights, torch.Tensor):
        axis = -1 if heads == 1 else -2
        if weights.dim() < 1 - axis or weights.shape[axis] != len(names) or (heads > 1 and weights.shape[-1] != heads):
            raise ValueError(f"routing weights must be (B[, T], {len(names)}{'' if heads == 1 else f', {heads}'}); "
                             f"got {tuple(weights.shape)}")
    elif not callable(weights):
        raise TypeError(f"routing weights must be a tensor or a callable(layer, x); got {type(weights).__name__}")
    with call_scope(_require_state(model), routing=Routing(names, weights, heads)):
        yield


def param_counts(model: nn.Module) -> tuple[int, int]:
    """``(trainable, total)`` parameter counts, each parameter counted once."""
    seen: dict[int, nn.Parameter] = {}
    for p in model.parameters():
        seen.setdefault(id(p), p)
    total = sum(p.numel() for p in seen.values())
    trainable = sum(p.numel() for p in seen.values() if p.requires_grad)
    return trainable, total
