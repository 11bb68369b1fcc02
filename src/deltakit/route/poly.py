"""Poly and MHR: a learned routing per task over a small inventory of skill adapters.

Polytropon (Ponti et al. 2023, "Combining Parameter-efficient Modules for Task-level
Generalisation", https://arxiv.org/abs/2202.13914) keeps S skill adapters and, per task t
(and per adapted layer), S logits ``Z[t]``. A batch row of task t uses the weights

    training:  w_s = sigmoid((Z[t, s] + log u - log(1 - u)) / tau),  u ~ U(0, 1)   (relaxed Bernoulli)
    eval:      w_s = sigmoid(Z[t, s])
    then       w  <- w / (sum_s w_s + 1e-12)

Multi-Head Routing (MHR; Caccia et al. 2023, "Multi-Head Adapter Routing for Cross-Task
Generalization", https://arxiv.org/abs/2211.03831) routes h blocks of every skill separately:
logits ``Z[t]`` of shape ``(S, h)``, normalised over skills per head. MHR with h = 1 is Poly.

**Output mixing by default; parameter mixing on request.** The papers (and
``peft.tuners.poly``) mix the skills' *parameters*, ``A_t = sum_s w_s A_s``,
``B_t = sum_s w_s B_s``, so a layer adds ``B_t A_t x = sum_{i,j} w_i w_j B_i A_j x``, cross
terms included. By default we mix the skills' *outputs*, ``sum_s w_s * scale_s * B_s A_s x``,
through the core's routed forward (:func:`deltakit.core.adapter.routed`), because

* the inventory here is usually a library of independently trained LoRAs. A LoRA's factors are
  defined only up to an invertible r x r matrix (``B M``, ``M^-1 A`` give the same dW), so the
  cross terms ``B_i A_j`` of separately trained skills are arbitrary: parameter averaging
  depends on a gauge no training fixed. Output mixing mixes the dWs themselves, which are
  well defined;
* it allows mixed ranks and mixed targets (a skill absent from a layer contributes zero) and
  any method the core can route, and runs in the core's one batched pass per layer;
* with one-hot weights both agree; they differ only for mixtures.

``mixing="parameter"`` computes the papers' form exactly (checked against peft's Poly to
float precision): plain LoRA skills of one rank on Linear / Conv1D layers, scale folded into B
(``B_t = sum_s w_s scale_s B_s``), no dropout on the skill branch (as peft). It suits skills
trained jointly with the routing from scratch (:meth:`Poly.fresh_skills`), as in the paper.
Its forward hook (installed once per layer, inert outside a parameter-mixing scope) adds
``B_t A_t x`` to the base output per row, one batched matmul pair per layer.

**MHR heads.** Under output mixing the core splits each skill's rank r into h equal blocks
(block j: rows ``j r/h .. (j+1) r/h`` of A, the matching columns of B) and weights block j of
skill s by ``w[s, j]``: a rank block is itself a LoRA, so it is the natural unit when outputs
mix. Under parameter mixing heads follow peft's ``n_splits`` (after the paper): A's input
dimension and B's output dimension split in h blocks, each mixed with its own weights. Either
way a task has S*h logits per layer.

**Per layer or shared.** As in the paper and peft, each adapted layer has its own logits by
default (``layers``: the module paths, see :meth:`Poly.for_model`); ``layers=()`` shares one
routing between all layers (fewer parameters, for routing from a handful of examples).

Variants: MHR-z (few-shot adaptation of the routing only, skills frozen) is
:meth:`Poly.fit_routing` with ``train_skills=False``, the default. MHR-mu (drop the routing,
average the skills into one adapter, fine-tune that) is a uniform merge plus ordinary LoRA
training, not a router: ``deltakit merge`` then ``fit``.

The noise in training comes from the global torch RNG, like dropout: :func:`deltakit.fit`
seeds it and its checkpoints keep it, so a resumed run draws the same noise. Whether weights
are sampled follows ``router.routing.training`` (as peft's router): :meth:`fit_routing` leaves
it in eval mode.

Example (two tasks routed over two attached skills, then inference with the routing):

>>> import torch, deltakit as dk
>>> model = torch.nn.Sequential(torch.nn.Linear(4, 4))
>>> for k in ("a", "b"):
...     _ = dk.attach(model, dk.LoraConfig(r=2, targets=["0"]), name=k)
>>> router = Poly.for_model(model, ("a", "b"), tasks=("t0", "t1"))
>>> router.weights(torch.tensor([0, 1])).shape   # (L, B, S, h)
torch.Size([1, 2, 2, 1])
>>> with router.scope(model, {"task_ids": torch.tensor([0, 1])}):
...     y = model(torch.randn(2, 4))
"""
from __future__ import annotations

import contextlib
import functools
import json
import os
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextvars import ContextVar
from dataclasses import dataclass, field
from typing import Any, Literal, get_args

import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader, default_collate

from ..core.adapter import adapters, attach, disabled, routed
from ..core.layer import DeltaLayer
from ..core.seeding import generator as seeded_generator
from ..io.tensors import load_tensors, read_header, save_tensors
from ..methods.lora import LoRA, LoraConfig
from ..train import TrainResult, fit
from ._base import Router, RoutingError, get_router, register_router

__all__ = ["Poly", "MHR", "PolyRouting", "PolyModel", "Mixing", "poly_weights", "param_mixed_residual"]

Mixing = Literal["output", "parameter"]

EPS = 1e-12  # as peft and mttl: the normaliser of an all-zero draw stays finite
FORMAT = "deltakit.route.poly/1"


def poly_weights(logits: Tensor, *, sample: bool, temperature: float = 1.0,
                 generator: torch.Generator | None = None) -> Tensor:
    """Routing weights from logits ``(..., S, h)``, normalised over the skill axis (-2).

    ``sample``: a relaxed-Bernoulli draw (Gumbel-sigmoid, the same numbers as
    ``torch.distributions.RelaxedBernoulli(temperature, logits=...).rsample()`` from the same
    RNG state), else plain ``sigmoid``. Differentiable in ``logits`` either way.
    """
    if sample:
        u = torch.rand(logits.shape, dtype=logits.dtype, device=logits.device, generator=generator)
        tiny = torch.finfo(logits.dtype).eps
        u = u.clamp(tiny, 1 - tiny)
        p = torch.sigmoid((u.log() - (-u).log1p() + logits) / temperature)
    else:
        p = torch.sigmoid(logits)
    return p / (p.sum(dim=-2, keepdim=True) + EPS)


class PolyRouting(nn.Module):
    """The routing logits: ``logits`` ``(L, T, S, h)`` (L = 1 when shared between layers).

    Initialised uniform in (-1e-3, 1e-3) as peft's ``PolyRouter.reset``, from a seeded
    generator (so a router is reproducible without touching the global RNG).
    """

    def __init__(self, n_layers: int, n_tasks: int, n_skills: int, heads: int = 1, seed: int = 0):
        super().__init__()
        g = seeded_generator(seed, "poly.routing")
        init = torch.rand((n_layers, n_tasks, n_skills, heads), generator=g) * 2e-3 - 1e-3
        self.logits = nn.Parameter(init)

    def forward(self, task_ids: Tensor, *, sample: bool, temperature: float = 1.0) -> Tensor:
        """Weights ``(L, B, S, h)`` for rows of tasks ``task_ids`` ``(B,)``."""
        z = self.logits[:, task_ids.to(self.logits.device)]  # (L, B, S, h)
        return poly_weights(z, sample=sample, temperature=temperature)


@register_router("poly")
@dataclass(eq=False)
class Poly(Router):
    """Poly: per-task routing over the skills ``names`` (attached to the model), learned with ``fit``.

    ``tasks``: task names (row ``i`` of ``batch["task_ids"]`` is an index into them, or a
    name); or only ``n_tasks``. ``layers``: module paths with their own routing (in the
    order of ``routing.logits``' first axis), ``()`` for one routing shared by all layers.
    ``temperature``: of the relaxed Bernoulli in training. ``seed``: of the logits' init.
    ``mixing``: ``"output"`` (default: the core's routed forward, any ranks / targets) or
    ``"parameter"`` (the papers' and peft's ``A_t = sum w A``, ``B_t = sum w B``; LoRA skills of
    equal rank on Linear / Conv1D layers; MHR heads then split A's input and B's output
    dimensions as peft's ``n_splits``); see the module docstring.
    """

    n_tasks: int = 0
    tasks: tuple[str, ...] = ()
    layers: tuple[str, ...] = ()
    temperature: float = 1.0
    seed: int = 0
    mixing: Mixing = "output"
    routing: PolyRouting = field(init=False, repr=False)
    fit_result: TrainResult | None = field(default=None, init=False, repr=False)

    def __post_init__(self) -> None:
        self.names, self.tasks, self.layers = tuple(self.names), tuple(map(str, self.tasks)), tuple(self.layers)
        if not self.names or len(set(self.names)) != len(self.names):
            raise RoutingError(f"{self.router_name}: expected distinct skill adapter names, found {list(self.names)}")
        if self.tasks and self.n_tasks not in (0, len(self.tasks)):
            raise RoutingError(f"{self.router_name}: n_tasks={self.n_tasks} but {len(self.tasks)} task names given")
        self.n_tasks = self.n_tasks or len(self.tasks)
        if self.n_tasks < 1:
            raise RoutingError(f"{self.router_name}: expected n_tasks >= 1 or task names, found {self.n_tasks}")
        self.tasks = self.tasks or tuple(str(i) for i in range(self.n_tasks))
        if len(set(self.tasks)) != len(self.tasks):
            raise RoutingError(f"{self.router_name}: task names must be distinct, found {list(self.tasks)}")
        if not self.temperature > 0:
            raise RoutingError(f"{self.router_name}: expected temperature > 0, found {self.temperature}")
        if self.mixing not in get_args(Mixing):
            raise RoutingError(f"{self.router_name}: expected mixing in {list(get_args(Mixing))}, found {self.mixing!r}")
        self.routing = PolyRouting(max(1, len(self.layers)), self.n_tasks, len(self.names), self.n_heads, self.seed)
        self.routing.eval()

    @property
    def n_heads(self) -> int:
        """Routing heads per skill (1 for Poly; MHR's ``heads``)."""
        return 1

    # ------------------------------------------------------------ building
    @classmethod
    def for_model(cls, model: nn.Module, names: Sequence[str], *, per_layer: bool = True, **options) -> "Poly":
        """A router over ``names`` with one routing per layer that holds any of them
        (``per_layer``), else one shared routing. ``options``: the other fields."""
        names = tuple(names)
        known = adapters(model)
        missing = [n for n in names if n not in known]
        if missing:
            raise RoutingError(f"{cls.router_name}: skills {missing} are not attached; attached: {sorted(known)}")
        layers = tuple(p for p, m in model.named_modules()
                       if isinstance(m, DeltaLayer) and any(n in m.deltas for n in names)) if per_layer else ()
        return cls(names, layers=layers, **options)

    @staticmethod
    def fresh_skills(model: nn.Module, n_skills: int, config: LoraConfig, *, prefix: str = "skill") -> tuple[str, ...]:
        """Attach ``n_skills`` fresh LoRAs ``prefix0, prefix1, ...`` (the paper's inventory
        trained from scratch with the routing: ``fit_routing(..., train_skills=True)``);
        returns their names. Their A is drawn from the global RNG (seed it first); B is zero."""
        names = tuple(f"{prefix}{i}" for i in range(n_skills))
        for n in names:
            attach(model, config, name=n, activate=False)
        return names

    # ------------------------------------------------------------ routing
    def task_index(self, task_ids: Tensor | Sequence[int | str]) -> Tensor:
        """``(B,)`` long indices from indices or task names, checked against the known tasks."""
        if isinstance(task_ids, Tensor):
            ids = task_ids.reshape(-1).long()
        else:
            ids = torch.tensor([self.tasks.index(t) if isinstance(t, str) and t in self.tasks else
                                _int_task(t, self.tasks) for t in task_ids], dtype=torch.long)
        bad = ids[(ids < 0) | (ids >= self.n_tasks)]
        if bad.numel():
            raise RoutingError(f"{self.router_name}: task ids must be in [0, {self.n_tasks}); found {bad.tolist()[:5]}")
        return ids

    def weights(self, task_ids: Tensor | Sequence[int | str]) -> Tensor:
        """``(L, B, S, h)``: sampled while ``routing.training``, else sigmoid-normalised."""
        return self.routing(self.task_index(task_ids), sample=self.routing.training, temperature=self.temperature)

    @torch.no_grad()
    def task_weights(self) -> dict[str, dict[str, float]]:
        """Per task, each skill's eval-mode weight averaged over layers and heads (largest
        first): what the routing learned, for reports and ``deltakit route``."""
        w = poly_weights(self.routing.logits.detach().float(), sample=False).mean(dim=(0, -1))  # (T, S)
        out = {}
        for t, row in zip(self.tasks, w):
            order = torch.argsort(row, descending=True).tolist()
            out[t] = {self.names[i]: round(float(row[i]), 4) for i in order}
        return out

    def weights_for(self, model: nn.Module, batch: Mapping[str, Any]) -> Tensor | Callable:
        """``(B, S)`` (MHR: ``(B, S, h)``) when shared between layers; else a callable
        ``fn(layer, x)`` giving each layer its own rows of weights."""
        return self._layer_weights(model, self._batch_weights(batch))

    def _batch_weights(self, batch: Mapping[str, Any]) -> Tensor:
        if "task_ids" not in batch:
            raise RoutingError(f"{self.router_name}: the batch needs 'task_ids' (B,); found keys {sorted(batch)}")
        return self.weights(batch["task_ids"])

    def _layer_weights(self, model: nn.Module, w: Tensor) -> Tensor | Callable:
        w = w if self.n_heads > 1 else w[..., 0]  # (L, B, S[, h])
        if not self.layers:
            return w[0]
        index = self._layer_index(model)

        def per_layer(layer: nn.Module, x: Tensor) -> Tensor:
            i = index.get(id(layer))
            if i is None:
                raise RoutingError(f"{self.router_name}: a layer holding skills {list(self.names)} has no routing; "
                                   "build the router after attaching every skill")
            return w[i]
        return per_layer

    def _layer_index(self, model: nn.Module) -> dict[int, int]:
        index = {}
        for i, path in enumerate(self.layers):
            try:
                index[id(model.get_submodule(path))] = i
            except AttributeError:
                raise RoutingError(f"{self.router_name}: routed layer {path!r} is not in this model") from None
        return index

    @contextlib.contextmanager
    def scope(self, model: nn.Module, batch: Mapping[str, Any]) -> Iterator[None]:
        """Within the block ``model``'s forwards mix the skills with this batch's task weights;
        ``decisions`` records, per row, each skill's weight averaged over layers and heads."""
        w = self._batch_weights(batch)  # (L, B, S, h): drawn once, so a recompute sees the same noise
        self.record(w.mean(dim=(0, -1)))
        if self.mixing == "parameter":
            with _parameter_mixing(self._mixing_plan(model, w)), disabled(model):
                yield
            return
        with routed(model, self.names, self._layer_weights(model, w), heads=self.n_heads):
            yield

    def _mixing_plan(self, model: nn.Module, w: Tensor) -> dict[int, tuple[list[LoRA | None], Tensor, int]]:
        """``id(layer) -> (skill deltas or None, weights (B, S, h), heads)`` for parameter mixing,
        every layer checked first, so a bad one fails before any forward runs."""
        index = self._layer_index(model) if self.layers else {}
        plan = {}
        for path, layer in model.named_modules():
            if not isinstance(layer, DeltaLayer):
                continue
            present = [layer.deltas[n] if n in layer.deltas else None for n in self.names]
            if all(d is None for d in present):
                continue
            i = index.get(id(layer)) if self.layers else 0
            if i is None:
                raise RoutingError(f"{self.router_name}: layer {path!r} holds skills but has no routing; "
                                   "build the router after attaching every skill")
            _check_mixable(f"{self.router_name}: layer {path!r}", present, self.n_heads)
            _hook(layer)
            plan[id(layer)] = (present, w[i], self.n_heads)
        return plan

    # ------------------------------------------------------------ files
    def save(self, path: str | os.PathLike) -> None:
        """The routing logits and what they index (skills, tasks, layers, heads) to one
        safetensors file, atomically."""
        meta = {"format": FORMAT, "router": self.router_name, "names": json.dumps(list(self.names)),
                "tasks": json.dumps(list(self.tasks)), "layers": json.dumps(list(self.layers)),
                "heads": str(self.n_heads), "temperature": repr(float(self.temperature)), "mixing": self.mixing}
        save_tensors(path, {"logits": self.routing.logits.detach().float().cpu()}, metadata=meta)

    def load_routing(self, path: str | os.PathLike) -> None:
        """Load logits saved by :meth:`save` into this router; a file for other skills,
        tasks, layers, heads or shape is refused with a one-line error."""
        meta, logits = _read_routing(path)
        mine = {"router": self.router_name, "names": list(self.names), "tasks": list(self.tasks),
                "layers": list(self.layers), "heads": self.n_heads}
        for key, want in mine.items():
            if meta[key] != want:
                raise RoutingError(f"{path}: routing saved for {key}={meta[key]}, this router has {key}={want}")
        if tuple(logits.shape) != tuple(self.routing.logits.shape):
            raise RoutingError(f"{path}: logits of shape {tuple(logits.shape)}, "
                               f"expected {tuple(self.routing.logits.shape)}")
        with torch.no_grad():
            self.routing.logits.copy_(logits)

    @classmethod
    def from_file(cls, path: str | os.PathLike) -> "Poly":
        """The router saved in ``path`` (Poly or MHR, as saved), with its logits."""
        meta, _ = _read_routing(path)
        kind = get_router(meta["router"])
        if not issubclass(kind, cls):
            raise RoutingError(f"{path}: holds a {meta['router']!r} router, expected {cls.router_name!r}")
        options = {"heads": meta["heads"]} if issubclass(kind, MHR) else {}
        router = kind(tuple(meta["names"]), tasks=tuple(meta["tasks"]), layers=tuple(meta["layers"]),
                      temperature=meta["temperature"], mixing=meta["mixing"], **options)
        router.load_routing(path)
        return router

    # ------------------------------------------------------------ training
    @classmethod
    def fit_routing(cls, model: nn.Module, names: Sequence[str], examples_by_task: Mapping[str, Sequence[Mapping]],
                    *, steps: int, per_layer: bool = True, train_skills: bool = False, batch_size: int = 8,
                    lr: float = 5e-2, collate: Callable | None = None, loss_fn: Callable | None = None,
                    seed: int = 0, fit_options: Mapping[str, Any] | None = None, **options) -> "Poly":
        """Learn a routing for each task of ``examples_by_task`` (task name -> rows) over the
        attached skills ``names``; returns the router (in eval mode, ``fit_result`` set).

        Rows are what ``collate`` (default: ``torch.utils.data.default_collate``) turns into a
        model batch, e.g. an :class:`~deltakit.train.instruct.InstructionDataset`'s items
        with its ``collate``; the loss is ``model(**batch).loss`` unless ``loss_fn(poly_model,
        batch)`` is given (call ``poly_model(task_ids=batch["task_ids"], ...)``). ``options``:
        router fields (``temperature``, MHR's ``heads``); ``fit_options``: more :func:`fit` arguments.
        """
        router = cls.for_model(model, names, per_layer=per_layer, tasks=tuple(map(str, examples_by_task)),
                               seed=seed, **options)
        router.train_routing(model, examples_by_task, steps=steps, train_skills=train_skills, batch_size=batch_size,
                             lr=lr, collate=collate, loss_fn=loss_fn, seed=seed, fit_options=fit_options)
        return router

    def train_routing(self, model: nn.Module, examples_by_task: Mapping[str, Sequence[Mapping]], *, steps: int,
                      train_skills: bool = False, batch_size: int = 8, lr: float = 5e-2,
                      collate: Callable | None = None, loss_fn: Callable | None = None, seed: int = 0,
                      fit_options: Mapping[str, Any] | None = None) -> TrainResult:
        """Train this router's logits (and the skills with ``train_skills``) with :func:`fit`
        on ``examples_by_task``, whose keys are this router's task names. Everything else in
        the model is frozen for the run (its ``requires_grad`` flags restored afterwards)."""
        unknown = [str(k) for k in examples_by_task if str(k) not in self.tasks]
        if unknown or not examples_by_task:
            raise RoutingError(f"{self.router_name}: examples for unknown tasks {unknown or 'none given'}; "
                               f"tasks: {list(self.tasks)}")
        rows = [{**row, "task_ids": self.tasks.index(str(key))} for key, task_rows in examples_by_task.items()
                for row in task_rows]
        loader = DataLoader(rows, batch_size=batch_size, shuffle=True,
                            collate_fn=functools.partial(_collate_with_tasks, collate or default_collate))
        wrapped = PolyModel(model, self)
        params = self.trainable(model, train_skills)
        with _only_these_train(wrapped, params.values()):
            self.fit_result = fit(wrapped, loader, max_steps=steps, lr=lr, loss_fn=loss_fn, params=params, seed=seed,
                                  progress=False, **dict(fit_options or {}))
        self.routing.eval()
        return self.fit_result

    def trainable(self, model: nn.Module, train_skills: bool = False) -> dict[str, nn.Parameter]:
        """What routing training updates: the logits, plus every skill parameter with ``train_skills``."""
        params = {"routing.logits": self.routing.logits}
        if train_skills:
            known = adapters(model)
            for n in self.names:
                params.update({f"skills.{n}.{k}": p for k, p in known[n].named_parameters()})
        return params


@register_router("mhr")
@dataclass(eq=False)
class MHR(Poly):
    """Multi-Head Routing: Poly with ``heads`` blocks of every skill routed separately (weights
    ``(B, S, heads)``, normalised over skills per head). Output mixing: the blocks split each
    skill's rank, which ``heads`` must divide; parameter mixing: they split A's input and B's
    output dimensions (peft's ``n_splits``), which ``heads`` must divide. ``heads=1`` is Poly."""

    heads: int = 2

    def __post_init__(self) -> None:
        self.heads = int(self.heads)
        if self.heads < 1:
            raise RoutingError(f"mhr: expected heads >= 1, found {self.heads}")
        super().__post_init__()

    @property
    def n_heads(self) -> int:
        return self.heads


class PolyModel(nn.Module):
    """``model`` with ``router``'s routing applied per call, so :func:`fit` can train it:
    ``forward(task_ids=..., **batch)`` runs ``model(**batch)`` inside ``router.scope``.
    The routing logits are a submodule (``poly_model.routing``); the skills stay in ``model``."""

    def __init__(self, model: nn.Module, router: Poly):
        super().__init__()
        self.model = model
        self.routing = router.routing
        self._router = router  # not a module: the Router dataclass only holds the logits module

    def forward(self, *args, task_ids: Tensor | Sequence[int | str], **kwargs):
        with self._router.scope(self.model, {"task_ids": task_ids}):
            return self.model(*args, **kwargs)

    # so fit(gradient_checkpointing=True) reaches a wrapped transformers model; the recompute
    # replays the routing (fit replays the forward's context variables), noise included
    def activation_checkpointing_enable(self, *args, **kwargs) -> None:
        self._checkpointing("enable")(*args, **kwargs)

    def activation_checkpointing_disable(self) -> None:
        self._checkpointing("disable")()

    @property
    def is_activation_checkpointing(self) -> bool:
        for prefix in ("activation", "gradient"):  # transformers 5 renamed gradient_ -> activation_
            if hasattr(type(self.model), f"is_{prefix}_checkpointing"):
                return bool(getattr(self.model, f"is_{prefix}_checkpointing"))
        return False

    def _checkpointing(self, what: str) -> Callable:
        for prefix in ("activation", "gradient"):
            fn = getattr(self.model, f"{prefix}_checkpointing_{what}", None)
            if fn is not None:
                return fn
        raise ValueError("expected a transformers model (with gradient_checkpointing_enable) for "
                         f"gradient checkpointing, found {type(self.model).__name__}")


def _int_task(t: object, tasks: Sequence[str]) -> int:
    if isinstance(t, bool) or not isinstance(t, int):
        raise RoutingError(f"expected task ids as ints or names in {list(tasks)}, found {t!r}")
    return t


def _collate_with_tasks(inner: Callable, rows: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """``inner``'s batch of the rows without ``task_ids``, plus ``task_ids`` ``(B,)``."""
    task_ids = torch.tensor([r["task_ids"] for r in rows], dtype=torch.long)
    batch = dict(inner([{k: v for k, v in r.items() if k != "task_ids"} for r in rows]))
    batch["task_ids"] = task_ids
    return batch


@contextlib.contextmanager
def _only_these_train(module: nn.Module, params: Iterator[nn.Parameter] | Sequence[nn.Parameter]) -> Iterator[None]:
    """Within the block only ``params`` require grad; every flag is restored afterwards."""
    keep = {id(p) for p in params}
    flags = [(p, p.requires_grad) for p in module.parameters()]
    try:
        for p, _ in flags:
            p.requires_grad_(id(p) in keep)
        yield
    finally:
        for p, flag in flags:
            p.requires_grad_(flag)


def _read_routing(path: str | os.PathLike) -> tuple[dict[str, Any], Tensor]:
    """``(metadata, logits)`` of a routing file, with one-line errors for anything else."""
    _, meta = read_header(path)
    if (meta or {}).get("format") != FORMAT:
        raise RoutingError(f"{path}: not a Poly/MHR routing file (format {(meta or {}).get('format')!r}, "
                           f"expected {FORMAT!r})")
    tensors = load_tensors(path)
    logits = tensors.get("logits")
    if logits is None or logits.dim() != 4:
        raise RoutingError(f"{path}: expected one 4-d tensor 'logits' (L, T, S, h), "
                           f"found {sorted((k, tuple(v.shape)) for k, v in tensors.items())}")
    out = {k: json.loads(meta[k]) for k in ("names", "tasks", "layers")}
    return {**out, "router": meta["router"], "heads": int(meta["heads"]), "temperature": float(meta["temperature"]),
            "mixing": meta.get("mixing", "output")}, logits


# -------------------------------------------------------------------- parameter mixing
# Which layers mix parameters in this call, and with what: per call, as the core's routing, so
# threads routing one model at once each see their own plan. The hook it drives is installed
# once per layer and does nothing outside a parameter-mixing scope.
_PLAN: ContextVar[dict[int, tuple[list[LoRA | None], Tensor, int]] | None] = ContextVar(
    "deltakit_poly_parameter_mixing", default=None)


def param_mixed_residual(deltas: Sequence[LoRA | None], w: Tensor, x: Tensor, heads: int = 1) -> Tensor:
    """Poly's parameter mixing at one layer: row b adds ``B_b A_b x`` with
    ``A_b = sum_s w[b, s] A_s`` and ``B_b = sum_s w[b, s] scale_s B_s`` (an absent skill, None,
    has zero factors). With ``heads`` h (MHR, as peft's ``n_splits``), A's input dimension and
    B's output dimension split in h equal blocks, block q mixed with ``w[b, :, q]``.

    w: ``(B, S, h)``; x: ``(B, ..., in)``; returns ``(B, ..., out)``. Skills: LoRA of one rank.
    """
    cols = [s for s, d in enumerate(deltas) if d is not None]
    A = torch.stack([deltas[s].lora_A for s in cols])                              # (S, r, in)
    B = torch.stack([deltas[s].lora_B * deltas[s].scale for s in cols]).to(A.dtype)  # (S, out, r)
    n, r, d_in = A.shape
    d_out = B.shape[1]
    w = w[:, cols].to(device=A.device, dtype=A.dtype)                               # (B, S, h)
    A_b = torch.einsum("bsq,srqi->brqi", w, A.reshape(n, r, heads, d_in // heads)).reshape(-1, r, d_in)
    B_b = torch.einsum("bsq,sqor->bqor", w, B.reshape(n, heads, d_out // heads, r)).reshape(-1, d_out, r)
    xb = x.to(A.dtype).reshape(x.shape[0], -1, d_in)                               # (B, T, in)
    y = (xb @ A_b.transpose(1, 2)) @ B_b.transpose(1, 2)                           # (B, T, out)
    return y.reshape(*x.shape[:-1], d_out)


def _check_mixable(where: str, deltas: Sequence[LoRA | None], heads: int) -> None:
    """Parameter mixing needs plain LoRA on Linear / Conv1D, one rank, dims divisible by heads."""
    present = [d for d in deltas if d is not None]
    bad = sorted({type(d).__name__ for d in present
                  if not isinstance(d, LoRA) or type(d).residual is not LoRA.residual or d.layout not in ("linear", "conv1d")})
    if bad:
        raise RoutingError(f"{where}: parameter mixing needs LoRA skills on Linear / Conv1D layers, found {bad}")
    ranks = sorted({int(d.r) for d in present})
    if len(ranks) > 1:
        raise RoutingError(f"{where}: parameter mixing needs skills of one rank, found ranks {ranks} (use mixing='output')")
    d_out, d_in = present[0].lora_B.shape[0], present[0].lora_A.shape[1]
    if d_in % heads or d_out % heads:
        raise RoutingError(f"{where}: {heads} heads must divide the input and output sizes, found {d_in} and {d_out}")


def _hook(layer: nn.Module) -> None:
    # looked up in the layer's own hooks (not a registry here), so a deep copy keeps exactly one
    if not any(h is _mixing_hook for h in layer._forward_hooks.values()):
        layer.register_forward_hook(_mixing_hook)


def _mixing_hook(layer: nn.Module, args: tuple, output: Tensor) -> Tensor | None:
    plan = _PLAN.get()
    entry = plan.get(id(layer)) if plan else None
    if entry is None:
        return None
    if not args:
        raise RoutingError("parameter mixing needs the layer's input passed positionally")
    deltas, w, heads = entry
    return output + param_mixed_residual(deltas, w, args[0], heads).to(output.dtype)


@contextlib.contextmanager
def _parameter_mixing(plan: dict[int, tuple[list[LoRA | None], Tensor, int]]) -> Iterator[None]:
    token = _PLAN.set(plan)
    try:
        yield
    finally:
        _PLAN.reset(token)
