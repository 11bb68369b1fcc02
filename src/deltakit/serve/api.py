"""The HTTP front: an OpenAI-compatible FastAPI app over an :class:`~deltakit.serve.engine.Engine`.

Endpoints (the official ``openai`` client works unchanged; vLLM's LoRA management shapes):

* ``POST /v1/completions``, ``POST /v1/chat/completions``: streaming (SSE) or not; ``model`` is
  the base's name, an adapter name or ``name@version``; chat renders the tokenizer's chat
  template with the generation prompt;
* ``GET /v1/models``: the base and every servable adapter (parent, version, lineage, tier);
* ``POST /v1/load_lora_adapter`` ``{"lora_name", "lora_path", "load_inplace"?}`` and
  ``POST /v1/unload_lora_adapter`` ``{"lora_name"}``: only when the server has an API key
  (loading files at a client's word is an operator's act);
* ``GET /health``, ``GET /metrics`` (Prometheus text; both open, as scrapers expect).

With an API key every ``/v1`` route needs ``Authorization: Bearer KEY`` (401 otherwise).
Errors use OpenAI's JSON shape ``{"error": {"message", "type", "param", "code"}}``: 400 bad
request, 401 bad key, 403 management disabled, 404 unknown model, 408 timeout, 429 queue full,
503 shutting down.

The event loop thread tokenises and formats; only the engine's scheduler thread touches the
model. Each request gets an ``asyncio.Queue`` that the scheduler feeds through
``loop.call_soon_threadsafe``; a client that disconnects cancels its generation.
"""
from __future__ import annotations

import asyncio
import contextlib
import json
import secrets
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from fastapi import Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, PlainTextResponse, Response, StreamingResponse
from pydantic import BaseModel, ConfigDict
from starlette.exceptions import HTTPException as StarletteHTTPException

from ..train.generate import encode_prompts
from ._metrics import CONTENT_TYPE, Metrics
from ._text import TextStream
from .engine import Engine, EngineClosed, Event, QueueFull
from .engine import Request as GenRequest
from .residency import PathNotAllowed, Residency, UnknownAdapter

__all__ = ["create_app", "APIError"]


class APIError(Exception):
    """An error answered in OpenAI's shape."""

    TYPES = {400: "invalid_request_error", 401: "authentication_error", 403: "permission_error",
             404: "invalid_request_error", 408: "timeout_error", 429: "rate_limit_error",
             500: "server_error", 503: "service_unavailable"}

    def __init__(self, status: int, message: str, code: str | None = None, param: str | None = None):
        super().__init__(message)
        self.status, self.message, self.code, self.param = status, message, code, param

    def response(self) -> JSONResponse:
        body = {"error": {"message": self.message, "type": self.TYPES.get(self.status, "server_error"),
                          "param": self.param, "code": self.code}}
        return JSONResponse(body, status_code=self.status)


class _Body(BaseModel):
    model_config = ConfigDict(extra="allow")
    model: str
    max_tokens: int | None = None
    temperature: float | None = None
    top_p: float | None = None
    seed: int | None = None
    stream: bool = False
    n: int = 1
    stop: str | list[str] | None = None


class CompletionBody(_Body):
    prompt: str | list[str] | list[int]


class ChatBody(_Body):
    messages: list[dict[str, Any]]
    max_completion_tokens: int | None = None


class LoadBody(BaseModel):
    lora_name: str
    lora_path: str
    load_inplace: bool = False


class UnloadBody(BaseModel):
    lora_name: str


@dataclass
class _Job:
    """One request in flight, as the API sees it."""

    gen: GenRequest
    label: str
    queue: asyncio.Queue
    text: TextStream
    started: float = field(default_factory=time.monotonic)
    first: float | None = None
    ended: bool = False


class _Service:
    """What the routes share: engine, residency, tokenizer, metrics and the base's name."""

    def __init__(self, engine: Engine, residency: Residency, tokenizer: Any, base_name: str,
                 api_key: str | None, default_max_tokens: int = 16):
        self.engine, self.residency, self.tokenizer = engine, residency, tokenizer
        self.base_name, self.api_key = base_name, api_key
        self.default_max_tokens = default_max_tokens
        self.metrics = Metrics(engine, residency)
        self.created = int(time.time())

    # ------------------------------------------------------------------ requests
    def start(self, body: _Body, prompt: list[int], max_tokens: int | None) -> _Job:
        """Resolve the model, build and submit the generation; errors become APIError."""
        if body.n != 1:
            raise APIError(400, f"expected n = 1, found {body.n}", param="n")
        label, key = self._adapter(body.model)
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue = asyncio.Queue()
        gen = GenRequest(prompt=prompt, max_tokens=max_tokens or self.default_max_tokens, adapter=key,
                         temperature=1.0 if body.temperature is None else body.temperature,
                         top_p=1.0 if body.top_p is None else body.top_p, seed=body.seed,
                         sink=lambda ev: loop.call_soon_threadsafe(queue.put_nowait, ev))
        stop = [body.stop] if isinstance(body.stop, str) else list(body.stop or [])
        try:
            self.engine.submit(gen)
        except ValueError as e:
            raise self._refused(label, APIError(400, str(e))) from None
        except QueueFull as e:
            raise self._refused(label, APIError(429, str(e), code="queue_full")) from None
        except EngineClosed as e:
            raise self._refused(label, APIError(503, str(e))) from None
        return _Job(gen, label, queue, TextStream(self.tokenizer, stop))

    def abandon(self, job: _Job) -> None:
        """The client left before the end: cancel the generation and count it as cancelled."""
        if job.ended:
            return
        job.ended = True
        self.engine.cancel(job.gen)
        self.metrics.finished(job.label, "cancelled", len(job.gen.prompt), len(job.gen.tokens),
                              time.monotonic() - job.started, job.first)

    def _adapter(self, model: str) -> tuple[str, str | None]:
        """(metrics label, attached adapter name or None for the base); pins the adapter."""
        if model == self.base_name:
            return model, None
        try:
            r = self.residency.acquire(model)
        except UnknownAdapter as e:
            raise self._refused("", APIError(404, str(e), code="model_not_found", param="model")) from None
        return r.public, r.key

    def _refused(self, label: str, err: APIError) -> APIError:
        self.metrics.refused(label, err.status)
        return err

    disconnect_poll = 0.5  # seconds between checks for a non-streaming client that went away

    async def next_event(self, job: _Job, request: Request | None) -> Event:
        """The job's next engine event. With ``request``, polls for a client that went away
        (non-streaming answers); a streaming response leaves that to Starlette, which listens for
        the disconnect itself and cancels the stream (polling too would take its message)."""
        if request is None:
            return await job.queue.get()
        while True:
            try:
                return await asyncio.wait_for(job.queue.get(), self.disconnect_poll)
            except TimeoutError:
                if await request.is_disconnected():
                    self.abandon(job)
                    raise APIError(499, "the client closed the connection") from None

    def on_token(self, job: _Job, ev: Event) -> str:
        """Text to send for a token event; a matched stop string cancels the rest."""
        if job.first is None:
            job.first = time.monotonic() - job.started
        delta = job.text.push(ev.token)
        if job.text.stopped:
            self.engine.cancel(job.gen)
        return delta

    def end(self, job: _Job, ev: Event) -> str:
        """The OpenAI finish reason of a final event (recorded in the metrics), or APIError."""
        reason = "stop" if job.text.stopped else ev.reason
        job.ended = True
        self.metrics.finished(job.label, reason if ev.kind == "done" else "error", len(job.gen.prompt),
                              len(job.gen.tokens), time.monotonic() - job.started, job.first)
        if ev.kind == "error":
            raise APIError(500, f"generation failed: {ev.error}")
        if reason == "timeout":
            raise APIError(408, f"the request did not finish within {job.gen.timeout or self.engine.limits.timeout} s",
                           code="timeout")
        return reason

    # ------------------------------------------------------------------ prompts
    def completion_prompt(self, prompt: str | list) -> list[int]:
        if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], str):
            prompt = prompt[0]
        if isinstance(prompt, str):
            return list(self.tokenizer(prompt)["input_ids"])
        if prompt and all(isinstance(t, int) for t in prompt):
            if any(not 0 <= t < len(self.tokenizer) for t in prompt):
                raise APIError(400, f"expected token ids in [0, {len(self.tokenizer)}), found {prompt[:8]}...",
                               param="prompt")
            return list(prompt)
        raise APIError(400, "expected prompt as one string or a list of token ids, found a list of "
                            f"{len(prompt)} items", param="prompt")

    def chat_prompt(self, messages: list[dict]) -> list[int]:
        msgs = []
        for i, m in enumerate(messages):
            content = m.get("content")
            if isinstance(content, list):  # content parts: text only
                if any(not isinstance(p, dict) or p.get("type") != "text" for p in content):
                    raise APIError(400, f"messages[{i}]: expected text content parts only", param="messages")
                content = "".join(p.get("text", "") for p in content)
            msgs.append({"role": m.get("role"), "content": content})
        try:
            return encode_prompts(self.tokenizer, [msgs], chat=True)[0]
        except (ValueError, TypeError, KeyError) as e:
            raise APIError(400, f"messages: {e}", param="messages") from None


def create_app(engine: Engine, residency: Residency, tokenizer: Any, *, base_name: str,
               api_key: str | None = None, base_path: str | None = None, drain_timeout: float = 60.0,
               routes: Callable[[FastAPI, _Service], None] | None = None) -> FastAPI:
    """The app; its lifespan starts the engine and, at shutdown, drains the requests in flight.
    ``routes`` adds the model's own endpoints (default: completions and chat; an encoder's
    classification comes from :mod:`.classify`); models, adapters, health, metrics, auth and
    errors are the same for every kind."""
    svc = _Service(engine, residency, tokenizer, base_name, api_key)

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI):
        engine.start()
        yield
        await asyncio.to_thread(engine.close, drain=True, timeout=drain_timeout)

    app = FastAPI(title="deltakit serve", lifespan=lifespan, dependencies=[Depends(_bearer(svc))])
    app.state.service = svc
    _errors(app)
    (routes or _generation_routes)(app, svc)
    _admin_routes(app, svc, base_path)
    return app


def _errors(app: FastAPI) -> None:
    @app.exception_handler(APIError)
    async def api_error(_: Request, e: APIError):
        return e.response()

    @app.exception_handler(RequestValidationError)
    async def invalid(_: Request, e: RequestValidationError):
        first = e.errors()[0] if e.errors() else {}
        where = ".".join(str(x) for x in first.get("loc", ()) if x != "body")
        return APIError(400, f"{where or 'body'}: {first.get('msg', 'invalid request')}", param=where or None).response()

    @app.exception_handler(StarletteHTTPException)
    async def http_error(_: Request, e: StarletteHTTPException):
        return APIError(e.status_code, str(e.detail)).response()


def _bearer(svc: _Service):
    """A dependency of every route (not an HTTP middleware: Starlette's BaseHTTPMiddleware wraps
    ``receive``, and a non-streaming handler then never sees its client disconnect)."""
    async def check(request: Request) -> None:
        if svc.api_key and request.url.path.startswith("/v1"):
            got = request.headers.get("authorization", "")
            if not secrets.compare_digest(got.encode(), f"Bearer {svc.api_key}".encode()):
                raise APIError(401, "invalid or missing API key (expected Authorization: Bearer KEY)",
                               code="invalid_api_key")
    return check


def _generation_routes(app: FastAPI, svc: _Service) -> None:
    @app.post("/v1/completions")
    async def completions(body: CompletionBody, request: Request):
        job = svc.start(body, svc.completion_prompt(body.prompt), body.max_tokens)
        return await _answer(svc, job, request, body, chat=False)

    @app.post("/v1/chat/completions")
    async def chat(body: ChatBody, request: Request):
        job = svc.start(body, svc.chat_prompt(body.messages), body.max_completion_tokens or body.max_tokens)
        return await _answer(svc, job, request, body, chat=True)


async def _answer(svc: _Service, job: _Job, request: Request, body: _Body, *, chat: bool):
    rid = f"{'chatcmpl' if chat else 'cmpl'}-{job.gen.id}-{secrets.token_hex(4)}"
    head = {"id": rid, "created": int(time.time()), "model": body.model}
    if body.stream:
        return StreamingResponse(_sse(svc, job, head, chat), media_type="text/event-stream")
    parts = []
    try:
        while (ev := await svc.next_event(job, request)).kind == "token":
            parts.append(svc.on_token(job, ev))
        reason = svc.end(job, ev)
    finally:
        svc.abandon(job)  # a no-op unless the handler was cancelled or the client left
    text = "".join(parts) + job.text.finish()
    choice = ({"index": 0, "message": {"role": "assistant", "content": text}, "logprobs": None, "finish_reason": reason}
              if chat else {"index": 0, "text": text, "logprobs": None, "finish_reason": reason})
    n_prompt, n_out = len(job.gen.prompt), len(job.gen.tokens)
    return {**head, "object": "chat.completion" if chat else "text_completion", "choices": [choice],
            "usage": {"prompt_tokens": n_prompt, "completion_tokens": n_out, "total_tokens": n_prompt + n_out}}


async def _sse(svc: _Service, job: _Job, head: dict, chat: bool):
    """Server-sent events: one chunk per piece of final text, the finish reason, ``[DONE]``.
    Leaving early (the client disconnected) cancels the generation."""
    kind = "chat.completion.chunk" if chat else "text_completion"

    def chunk(text: str | None, reason: str | None = None, role: bool = False) -> str:
        delta = {**({"role": "assistant"} if role else {}), **({"content": text} if text is not None else {})}
        choice = ({"index": 0, "delta": delta, "logprobs": None, "finish_reason": reason} if chat
                  else {"index": 0, "text": text or "", "logprobs": None, "finish_reason": reason})
        return f"data: {json.dumps({**head, 'object': kind, 'choices': [choice]})}\n\n"

    try:
        if chat:
            yield chunk("", role=True)
        while (ev := await svc.next_event(job, None)).kind == "token":
            if text := svc.on_token(job, ev):
                yield chunk(text)
        try:
            reason = svc.end(job, ev)
        except APIError as e:
            yield f"data: {json.dumps(json.loads(e.response().body))}\n\n"
        else:
            if tail := job.text.finish():
                yield chunk(tail)
            yield chunk(None if chat else "", reason)
        yield "data: [DONE]\n\n"
    finally:
        svc.abandon(job)


def _admin_routes(app: FastAPI, svc: _Service, base_path: str | None) -> None:
    @app.get("/v1/models")
    async def models():
        base = {"id": svc.base_name, "object": "model", "created": svc.created, "owned_by": "deltakit",
                "root": base_path or svc.base_name, "parent": None, "version": None, "lineage": [], "tier": "device"}
        rows = [{"object": "model", "created": svc.created, "owned_by": "deltakit", "parent": svc.base_name, **a}
                for a in await asyncio.to_thread(svc.residency.listing)]
        return {"object": "list", "data": [base, *rows]}

    @app.post("/v1/load_lora_adapter")
    async def load(body: LoadBody):
        _management(svc)
        try:
            key = svc.residency.register(body.lora_name, body.lora_path, replace=body.load_inplace)
        except (PathNotAllowed, FileNotFoundError, ValueError) as e:
            raise APIError(400, str(e), param="lora_path") from None
        try:  # attach now, on the scheduler thread: a bad adapter is refused here, not on first use
            await asyncio.wrap_future(svc.engine.call(lambda: svc.residency.ensure(key)))
        except Exception as e:
            with contextlib.suppress(UnknownAdapter):
                svc.residency.unregister(body.lora_name)
            raise APIError(400, f"{body.lora_name}: {e}", param="lora_path") from None
        return PlainTextResponse(f"Success: LoRA adapter '{body.lora_name}' added successfully.")

    @app.post("/v1/unload_lora_adapter")
    async def unload(body: UnloadBody):
        _management(svc)
        try:
            svc.residency.unregister(body.lora_name)
        except UnknownAdapter as e:
            raise APIError(404, str(e), code="model_not_found", param="lora_name") from None
        svc.engine.wake()
        return PlainTextResponse(f"Success: LoRA adapter '{body.lora_name}' removed successfully.")

    @app.get("/health")
    async def health():
        """200 while the scheduler runs; 503 once it has stopped (shutdown or a crash)."""
        alive = svc.engine.alive
        return JSONResponse({"status": "ok" if alive else "stopped"}, status_code=200 if alive else 503)

    @app.get("/metrics")
    async def metrics():
        return Response(svc.metrics.text(), media_type=CONTENT_TYPE)


def _management(svc: _Service) -> None:
    if not svc.api_key:
        raise APIError(403, "adapter loading and unloading need a server started with --api-key")
