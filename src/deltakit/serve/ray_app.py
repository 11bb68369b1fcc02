"""The same server scaled out on Ray Serve: N engine replicas of one base, adapters multiplexed.

Two deployments:

* **the router** (one replica, no CPU of its own) is Ray Serve's FastAPI ingress. It reads the
  OpenAI ``model`` field of ``/v1/completions`` and ``/v1/chat/completions`` and forwards the
  request with ``multiplexed_model_id=model``, so Ray routes it to a replica that already holds
  that adapter (Ray's model multiplexing; the base's own name routes anywhere). A client may also
  send Ray's ``serve_multiplexed_model_id`` header itself; the ``model`` field wins.
* **the engine replicas** (``--ray-replicas N``) each own one copy of the base with its
  :class:`~deltakit.serve.engine.Engine` (continuous batching) and
  :class:`~deltakit.serve.residency.Residency`, built by :func:`~deltakit.serve.server.build_app`
  exactly as ``deltakit serve`` builds them. A request runs through that replica's own
  :func:`~deltakit.serve.api.create_app` app, called in-process as an ASGI app, so every route,
  error shape, limit and the streaming (SSE) answer are the single-process server's; nothing is
  re-implemented here. Ray's ``@serve.multiplexed(max_num_models_per_replica=--resident)``
  attaches the adapter to the replica's model on its first request and tells the routers which
  replica holds which adapter; the residency's own LRU (capacity ``--resident``, then the host
  tier) sees the same requests, so both evict the least recently used adapter.

Each answer carries ``x-deltakit-replica`` (the replica's id) and ``x-deltakit-adapter-resident``
(``yes`` when the adapter was already attached on that replica before this request arrived), so
routing can be observed from outside.

Not on Ray: ``/v1/load_lora_adapter`` and ``/v1/unload_lora_adapter`` (501): one request would
change one replica only. Serve adapters from ``--adapter NAME=PATH`` or ``--library DIR`` (a path
every node can read); replicas attach them on demand. ``/v1/models``, ``/health`` and ``/metrics``
answer from whichever replica Ray picks (the metrics are that replica's).

On a Ray cluster
----------------
Start Ray on each machine, then run the server from any of them (the base, the adapters and the
library must be readable at the same path on every node, e.g. a shared filesystem)::

    ray start --head --port 6379                      # the head node
    ray start --address HEAD_IP:6379                  # every other node
    deltakit serve smollm2 --library /shared/adapters --ray-replicas 4 --ray-address auto \\
        --host 0.0.0.0 --port 8000 --resident 16

``--ray-address auto`` joins the cluster this machine belongs to (or give ``HEAD_IP:6379``);
without ``--ray-address`` a local Ray is started for the process. Each replica asks Ray for
``--threads`` CPUs (default 1); Ray places replicas across nodes, and Serve's HTTP proxy on each
node answers on ``--host:--port``. Clients use the openai client unchanged
(``base_url=http://HOST:8000/v1``, ``model="sql"``). Ctrl-C or SIGTERM shuts the application down.

>>> app = ray_application("runs/base", "tiny", ServeOptions(adapters={"a": "runs/a"}), replicas=2)  # doctest: +SKIP
>>> serve.run(app, name="deltakit", route_prefix="/")                                              # doctest: +SKIP
"""
# No ``from __future__ import annotations`` here: Ray pickles the deployment classes by value,
# and FastAPI must find the route's real annotation objects (a string "Request" would not resolve
# in the replica and the route would answer 422).
import asyncio
import json
import signal
import threading
from collections.abc import AsyncIterator

from fastapi import Request

from .server import ServeOptions

__all__ = ["ray_application", "run_on_ray", "asgi_stream", "REPLICA_HEADER", "RESIDENT_HEADER"]

REPLICA_HEADER = "x-deltakit-replica"
RESIDENT_HEADER = "x-deltakit-adapter-resident"
APP_NAME = "deltakit"
_MODEL_ROUTES = ("/v1/completions", "/v1/chat/completions")
_MANAGEMENT = ("/v1/load_lora_adapter", "/v1/unload_lora_adapter")


async def asgi_stream(app, method: str, path: str, query: bytes, headers: list[tuple[str, str]],
                      body: bytes) -> AsyncIterator[dict]:
    """Run one HTTP request through the ASGI ``app`` in this process and yield its messages:
    first ``{"status", "headers"}``, then ``{"body": bytes}`` pieces as the app sends them (so an
    SSE answer streams). Closing the iterator early is a client disconnect: the app receives
    ``http.disconnect`` and cancels the generation."""
    scope = {"type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": method,
             "scheme": "http", "path": path, "raw_path": path.encode(), "query_string": query, "root_path": "",
             "headers": [(k.lower().encode(), v.encode()) for k, v in headers],
             "client": ("127.0.0.1", 0), "server": ("127.0.0.1", 0)}
    out: asyncio.Queue = asyncio.Queue()
    gone = asyncio.Event()
    delivered = False

    async def receive() -> dict:
        nonlocal delivered
        if not delivered:
            delivered = True
            return {"type": "http.request", "body": body, "more_body": False}
        await gone.wait()
        return {"type": "http.disconnect"}

    task = asyncio.create_task(app(scope, receive, out.put))
    try:
        while True:
            msg = await _next_message(out, task)
            if msg["type"] == "http.response.start":
                yield {"status": msg["status"], "headers": [(k.decode(), v.decode()) for k, v in msg["headers"]]}
            elif msg["type"] == "http.response.body":
                if msg.get("body"):
                    yield {"body": msg["body"]}
                if not msg.get("more_body"):
                    break
    finally:
        gone.set()
        await task


async def _next_message(out: asyncio.Queue, task: asyncio.Task) -> dict:
    """The app's next message; the app's own exception if it ended without answering."""
    get = asyncio.ensure_future(out.get())
    await asyncio.wait({get, task}, return_when=asyncio.FIRST_COMPLETED)
    if get.done():
        return get.result()
    get.cancel()
    task.result()  # raises the app's error
    raise RuntimeError("the app returned without finishing its response")


def _engine_deployment(max_adapters: int):
    """The engine replica class, decorated for Ray Serve (``max_adapters`` fixes the multiplexing
    decorator's argument, which Ray takes at class definition)."""
    from ray import serve

    class EngineReplica:
        """One base, its engine and residency, and the app that answers through them."""

        def __init__(self, base: str, served_name: str, options: ServeOptions, dtype: str | None,
                     threads: int | None):
            import torch

            from ..io.models import load_causal_lm
            from .server import build_app
            if threads:
                torch.set_num_threads(threads)
            model, tok = load_causal_lm(base, dtype)
            self.app = build_app(model, tok, served_name, options, base_path=base)
            self.service = self.app.state.service
            self.service.engine.start()  # the app's lifespan does not run: it is called, not served
            self.replica = serve.get_replica_context().replica_id.unique_id

        @serve.multiplexed(max_num_models_per_replica=max_adapters)
        async def adapter(self, model_id: str) -> str:
            """Attach ``model_id`` on the scheduler thread (the only one touching the model)."""
            res = self.service.residency
            key = res.resolve(model_id).key
            await asyncio.wrap_future(self.service.engine.call(lambda: res.ensure(key)))
            return key

        async def forward(self, method: str, path: str, query: bytes, headers: list[tuple[str, str]],
                          body: bytes) -> AsyncIterator[dict]:
            resident = await self._hold(serve.get_multiplexed_model_id())
            extra = [(REPLICA_HEADER, self.replica), (RESIDENT_HEADER, resident)]
            async for msg in asgi_stream(self.app, method, path, query, headers, body):
                yield {**msg, "headers": msg["headers"] + extra} if "status" in msg else msg

        async def _hold(self, model_id: str) -> str:
            """Make the request's adapter resident through Ray's multiplexer; "yes" if it already
            was, "no" if this request attached it, "-" for the base or an unknown name (the
            app then answers 404 itself)."""
            from .residency import UnknownAdapter
            if not model_id or model_id == self.service.base_name:
                return "-"
            try:
                key = self.service.residency.resolve(model_id).key
            except UnknownAdapter:
                return "-"
            was = key in self.service.residency.attached()
            await self.adapter(model_id)
            return "yes" if was else "no"

        def __del__(self) -> None:
            service = getattr(self, "service", None)
            if service is not None:
                service.engine.close(drain=True, timeout=service.engine.limits.timeout)

    return EngineReplica


def _router_helpers():
    """The router's two helpers, as closures (Ray pickles them by value with the router, so the
    router's process imports nothing of deltakit)."""
    generation = _MODEL_ROUTES

    def model_of(path: str, body: bytes) -> str:
        """The ``model`` field of a generation request ("" for other routes, or a body that is not
        a JSON object: the replica's app answers those with its own 400)."""
        if path not in generation:
            return ""
        try:
            data = json.loads(body)
        except ValueError:
            return ""
        model = data.get("model") if isinstance(data, dict) else None
        return model if isinstance(model, str) else ""

    async def relay(gen):
        """The SSE body; a client that leaves mid-stream cancels the replica's generation."""
        finished = False
        try:
            async for m in gen:
                yield m["body"]
            finished = True
        finally:
            if not finished:
                gen.cancel()

    return model_of, relay


def _router_deployment():
    """The ingress: a FastAPI app whose one catch-all route forwards to an engine replica. It
    references nothing of deltakit at module level (Ray pickles it by value), so the router's
    process never imports torch."""
    from fastapi import FastAPI
    from fastapi.responses import JSONResponse, Response, StreamingResponse
    from ray import serve

    app = FastAPI(title="deltakit serve on Ray")
    model_of, relay = _router_helpers()
    management = _MANAGEMENT

    # bound before the class: serve.ingress pickles the app (and the routes' closures) at once
    @serve.ingress(app)
    class Router:
        def __init__(self, engine, base_name: str):
            self.engine, self.base_name = engine, base_name

        @app.api_route("/{path:path}", methods=["GET", "POST"])
        async def forward(self, path: str, request: Request):
            path = "/" + path
            if path in management:
                message = f"{path} is not served on Ray (it would change one replica only); use --adapter or --library"
                return JSONResponse({"error": {"message": message, "type": "server_error", "param": None,
                                               "code": "not_implemented"}}, status_code=501)
            body = await request.body()
            model = model_of(path, body) or request.headers.get("serve_multiplexed_model_id", "")
            routing = {"multiplexed_model_id": model} if model and model != self.base_name else {}
            gen = self.engine.options(stream=True, **routing).forward.remote(
                request.method, path, request.url.query.encode(), list(request.headers.items()), body)
            try:
                head = await gen.__anext__()
                headers = {k: v for k, v in head["headers"] if k.lower() not in ("content-length", "transfer-encoding")}
                if "text/event-stream" in headers.get("content-type", ""):
                    return StreamingResponse(relay(gen), status_code=head["status"], headers=headers)
                data = b"".join([m["body"] async for m in gen])
            except BaseException:
                gen.cancel()  # the client left (or the replica failed): stop the generation there too
                raise
            return Response(data, status_code=head["status"], headers=headers)

    return Router


def ray_application(base: str, served_name: str, options: ServeOptions, *, replicas: int,
                    dtype: str | None = None, threads: int | None = None):
    """The bound Ray Serve application: the router in front of ``replicas`` engine replicas, each
    holding up to ``options.resident`` adapters (Ray's multiplexing limit and the residency's
    device tier)."""
    from ray import serve
    if replicas < 1:
        raise ValueError(f"--ray-replicas: expected >= 1, found {replicas}")
    engine = serve.deployment(_engine_deployment(options.resident), name="engine", num_replicas=replicas,
                              ray_actor_options={"num_cpus": threads or 1},
                              max_ongoing_requests=options.limits.max_queue + options.limits.max_batch)
    router = serve.deployment(_router_deployment(), name="router", ray_actor_options={"num_cpus": 0},
                              max_ongoing_requests=1000)
    return router.bind(engine.bind(base, served_name, options, dtype, threads), served_name)


def start_on_ray(app, *, address: str | None, host: str, port: int, num_cpus: int | None = None) -> None:
    """Connect to (``address``) or start a local Ray, start Serve's HTTP proxy on ``host:port`` and
    run ``app`` at ``/``; returns once every replica is up."""
    import ray
    from ray import serve
    if not ray.is_initialized():
        if address:
            ray.init(address=address)
        else:
            # a local Ray listens on loopback only; a cluster is started with `ray start` and joined
            ray.init(num_cpus=num_cpus, include_dashboard=False, _node_ip_address="127.0.0.1")
    serve.start(http_options={"host": host, "port": port})
    serve.run(app, name=APP_NAME, route_prefix="/")


def run_on_ray(base: str, served_name: str, options: ServeOptions, *, replicas: int, address: str | None,
               host: str, port: int, dtype: str | None = None, threads: int | None = None) -> int:
    """``deltakit serve ... --ray-replicas N``: serve until SIGINT or SIGTERM, then delete the
    application (replicas drain their engines) and leave Ray."""
    import ray
    from ray import serve
    start_on_ray(ray_application(base, served_name, options, replicas=replicas, dtype=dtype, threads=threads),
                 address=address, host=host, port=port)
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):  # after ray.init, which installs its own handlers
        signal.signal(sig, lambda *_: stop.set())
    print(f"deltakit serve: {served_name} with {len(options.adapters)} adapter(s) on {replicas} Ray replica(s), "
          f"http://{host}:{port}", flush=True)
    try:
        stop.wait()
    finally:
        if address:  # a shared cluster: remove our application, leave Serve and Ray running
            serve.delete(APP_NAME)
        else:
            serve.shutdown()
        ray.shutdown()
    return 0
