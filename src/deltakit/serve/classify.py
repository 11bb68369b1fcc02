"""Serving an encoder base: ``POST /v1/classify`` with a classification head per adapter.

``{"model": NAME, "input": TEXT | [TEXT, ...]}`` -> one ``{"index", "label", "label_id",
"probs", "num_classes"}`` per text (vLLM's ``/classify`` shape), where NAME is an adapter
(its LoRA deltas and its own head, saved as a full delta through ``modules_to_save``), or the
base when its checkpoint has a trained head. Everything else is the generative server's:
``/v1/models``, adapter load / unload, ``/health``, ``/metrics`` (requests and prompt tokens
per adapter, latency), the API key and OpenAI's error shape (:mod:`.api`), and residency.

:class:`ClassifyEngine` is the generative :class:`~.engine.Engine` with another step: each
round takes whole waiting requests while their texts fit ``max_batch`` rows and runs them in
ONE forward under :func:`deltakit.mixed_batch`, each row with its request's adapter and head;
queueing, backpressure (429), timeouts, draining shutdown and calls on the scheduler thread
are inherited. Texts are never truncated: a text longer than ``max_prompt`` tokens is a 400.

>>> app = build_classify_app(model, tok, "minilm", ServeOptions(adapters={"sst2": "runs/sst2"}))  # doctest: +SKIP
"""
from __future__ import annotations

import asyncio
import itertools
import math
import secrets
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from pydantic import BaseModel, ConfigDict
from torch import Tensor, nn

from ..core.adapter import disabled, mixed_batch
from .engine import Engine, EngineClosed, QueueFull

__all__ = ["ClassifyEngine", "ClassifyRequest", "build_classify_app", "is_encoder", "load_encoder_base"]

_ids = itertools.count(1)


@dataclass(eq=False)
class ClassifyRequest:
    """Texts (as token ids) to classify with one adapter (None: the base). ``sink`` receives the
    ``(n, num_labels)`` probabilities, or the exception that ended the request."""

    rows: list[list[int]]
    sink: Callable[[Tensor | BaseException], None]
    adapter: str | None = None
    timeout: float | None = None
    temperature: float = 0.0   # read by Engine._enqueue; a classifier never samples
    id: int = field(default_factory=lambda: next(_ids))
    cancelled: bool = False
    finished: str | None = None
    deadline: float = math.inf
    rng: torch.Generator | None = None


class RequestTimeout(TimeoutError):
    """The request waited past its deadline (HTTP 408)."""


class ClassifyEngine(Engine):
    """Mixed-adapter classification batches over one encoder; see the module docstring."""

    def __init__(self, model: nn.Module, *, pad_token_id: int, limits=None, residency=None,
                 context_length: int | None = None):
        super().__init__(model, eos_token_ids=(), pad_token_id=pad_token_id, limits=limits, residency=residency,
                         context_length=context_length)

    def check(self, req: ClassifyRequest) -> None:
        """Raise ValueError (HTTP 400) for an empty request, too many texts or a too long one
        (longer than ``max_prompt`` or the model's positions: never truncated in silence)."""
        lim = self.limits
        if not 1 <= len(req.rows) <= lim.max_batch:
            raise ValueError(f"expected 1 to {lim.max_batch} texts per request, found {len(req.rows)}")
        longest = min(lim.max_prompt, self.context_length or lim.max_prompt)
        for i, row in enumerate(req.rows):
            if not 1 <= len(row) <= longest:
                raise ValueError(f"input[{i}]: expected 1 to {longest} tokens, found {len(row)}")

    def step(self) -> bool:
        self._run_calls()
        batch = self._admitting = self._take()
        if batch:
            self._classify(batch)
        self._admitting = []
        if self.residency is not None:
            self.residency.trim()
        return bool(batch)

    def _take(self) -> list[ClassifyRequest]:
        """Whole waiting requests, oldest first, while their texts fit ``max_batch`` rows; each
        gets its adapter attached first (a failure there fails that request only)."""
        out: list[ClassifyRequest] = []
        n, now = 0, time.monotonic()
        while True:
            with self._cv:
                if not self._queue or n + len(self._queue[0].rows) > self.limits.max_batch:
                    break
                r = self._queue.popleft()
            if self._ready(r, now):
                out.append(r)
                n += len(r.rows)
        return out

    @torch.no_grad()
    def _classify(self, reqs: list[ClassifyRequest]) -> None:
        """One forward for every row of ``reqs``; softmax over the head's labels, in fp32."""
        rows = [row for r in reqs for row in r.rows]
        names = [r.adapter for r in reqs for _ in r.rows]
        width = max(len(x) for x in rows)
        ids = torch.tensor([x + [self.pad] * (width - len(x)) for x in rows], device=self.device)   # (B, T)
        mask = torch.tensor([[1] * len(x) + [0] * (width - len(x)) for x in rows], device=self.device)
        scope = disabled(self.model) if all(a is None for a in names) else mixed_batch(self.model, names)
        with scope:
            probs = self.model(input_ids=ids, attention_mask=mask).logits.float().softmax(-1)   # (B, K)
        start = 0
        for r in reqs:
            self._finish(r, "done", probs=probs[start: start + len(r.rows)].cpu())
            start += len(r.rows)

    def _finish(self, r: ClassifyRequest, reason: str, error: BaseException | None = None,
                probs: Tensor | None = None) -> None:
        if r.finished is not None:
            return
        r.finished = reason
        if self.residency is not None and r.adapter is not None:
            self.residency.release(r.adapter)
        if reason == "timeout":
            error = RequestTimeout(f"the request waited longer than {r.timeout or self.limits.timeout} s")
        elif reason == "cancelled":
            error = RuntimeError("the request was cancelled")
        try:
            r.sink(error if error is not None else probs)
        except Exception:   # the client's loop is gone; nothing to tell
            r.cancelled = True


# ---------------------------------------------------------------------------- HTTP
class ClassifyBody(BaseModel):
    model_config = ConfigDict(extra="allow")
    model: str
    input: str | list[str]


def classify_routes(base_head: bool, labels: Mapping[int, str]):
    """The routes hook for :func:`~.api.create_app`: ``POST /v1/classify``. ``base_head``: the
    base's own head is trained (else naming the base is a 400: its head would be random)."""
    from .api import APIError

    def add(app, svc) -> None:
        @app.post("/v1/classify")
        async def classify(body: ClassifyBody):
            texts = [body.input] if isinstance(body.input, str) else body.input
            if body.model == svc.base_name and not base_head:
                raise APIError(400, f"the base {svc.base_name!r} has no trained classification head; expected an "
                                    "adapter name as model", param="model")
            rows = [list(x) for x in svc.tokenizer(texts)["input_ids"]] if texts else []
            label, key = svc._adapter(body.model)
            t0 = time.monotonic()
            probs = await _submit(svc, label, key, rows)
            n = sum(len(x) for x in rows)
            svc.metrics.finished(label, "done", n, 0, time.monotonic() - t0, None)
            return {"id": f"classify-{secrets.token_hex(8)}", "object": "list", "created": int(time.time()),
                    "model": body.model, "data": _rows(probs, labels),
                    "usage": {"prompt_tokens": n, "completion_tokens": 0, "total_tokens": n}}

    return add


async def _submit(svc, label: str, key: str | None, rows: list[list[int]]) -> Tensor:
    """Queue the request and await its probabilities; engine refusals and failures become APIError."""
    from .api import APIError

    loop = asyncio.get_running_loop()
    fut: asyncio.Future = loop.create_future()

    def deliver(out) -> None:
        if not fut.done():
            (fut.set_exception if isinstance(out, BaseException) else fut.set_result)(out)

    req = ClassifyRequest(rows, sink=lambda out: loop.call_soon_threadsafe(deliver, out), adapter=key)
    try:
        svc.engine.submit(req)
    except ValueError as e:
        raise svc._refused(label, APIError(400, str(e), param="input")) from None
    except QueueFull as e:
        raise svc._refused(label, APIError(429, str(e), code="queue_full")) from None
    except EngineClosed as e:
        raise svc._refused(label, APIError(503, str(e))) from None
    try:
        return await fut
    except RequestTimeout as e:
        raise svc._refused(label, APIError(408, str(e), code="timeout")) from None
    except asyncio.CancelledError:
        req.cancelled = True
        raise
    except Exception as e:
        raise svc._refused(label, APIError(500, f"classification failed: {e}")) from None


def _rows(probs: Tensor, labels: Mapping[int, str]) -> list[dict]:
    out = []
    for i, p in enumerate(probs.tolist()):
        k = max(range(len(p)), key=p.__getitem__)
        out.append({"index": i, "label": labels.get(k, str(k)), "label_id": k, "probs": p, "num_classes": len(p)})
    return out


def build_classify_app(model: nn.Module, tokenizer: Any, base_name: str, options, *, base_head: bool = False,
                       base_path: str | None = None):
    """The FastAPI app classifying with ``model`` (a sequence classifier) and the adapters of
    ``options`` (a :class:`~.server.ServeOptions`). ``base_head``: see :func:`classify_routes`."""
    from .api import create_app
    from .server import context_length, make_residency

    model.eval()
    residency = make_residency(model, base_name, options)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    engine = ClassifyEngine(model, pad_token_id=int(pad), limits=options.limits, residency=residency,
                            context_length=context_length(model))
    labels = {int(k): str(v) for k, v in (getattr(model.config, "id2label", None) or {}).items()}
    return create_app(engine, residency, tokenizer, base_name=base_name, api_key=options.api_key,
                      base_path=base_path, drain_timeout=options.drain_timeout,
                      routes=classify_routes(base_head, labels))


# ---------------------------------------------------------------------------- loading
def is_encoder(base: str) -> bool:
    """Whether BASE is served by classification: the bundled ``minilm``, or a checkpoint none of
    whose architectures is a causal LM (a BERT config also maps to a causal LM class in
    transformers, so its architectures decide, not its model type)."""
    from transformers import AutoConfig

    from ..io.models import BUNDLED, resolve_model

    if base == BUNDLED:
        return True
    arch = AutoConfig.from_pretrained(resolve_model(base)).architectures or []
    return bool(arch) and not any(a.endswith(("ForCausalLM", "LMHeadModel", "ForConditionalGeneration"))
                                  for a in arch)


def load_encoder_base(base: str, adapters: Mapping[str, str]) -> tuple[nn.Module, Any, bool]:
    """(classifier, tokenizer, whether the base's head is trained). The head's size comes from
    the adapters' manifests (which must agree) or, with none given, from the checkpoint's head."""
    from transformers import AutoConfig

    from ..io.adapter_files import read_manifest
    from ..io.models import load_classifier, resolve_model

    sizes = {name: (read_manifest(Path(p)).get("base_model") or {}).get("num_labels") for name, p in adapters.items()}
    if any(k is None for k in sizes.values()) or len(set(sizes.values())) > 1:
        raise ValueError(f"expected classifier adapters with one head size (num_labels), found {sizes}")
    cfg = AutoConfig.from_pretrained(resolve_model(base))
    trained = any(a.endswith("ForSequenceClassification") for a in cfg.architectures or [])
    if not sizes and not trained:
        raise ValueError(f"BASE {base}: an encoder without a classification head needs at least one --adapter "
                         "(its head gives the labels), found none")
    k = next(iter(sizes.values())) if sizes else int(cfg.num_labels)
    model, tok = load_classifier(base, k)
    return model, tok, trained and int(cfg.num_labels) == k
