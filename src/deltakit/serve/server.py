"""Putting a server together: base model, residency, engine, app; and running it with uvicorn,
in the foreground (the CLI) or in a background thread (tests, the demo).

>>> app = build_app(model, tok, "tiny", ServeOptions(adapters={"a": "runs/a"}))   # doctest: +SKIP
>>> with LiveServer(app) as srv:                                                  # doctest: +SKIP
...     openai.OpenAI(base_url=srv.url + "/v1", api_key="-").models.list()
"""
from __future__ import annotations

import threading
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from torch import nn

from ..train.generate import eos_ids
from .api import create_app
from .engine import Engine, Limits
from .residency import Residency

__all__ = ["ServeOptions", "build_app", "make_residency", "LiveServer", "context_length"]


@dataclass(frozen=True)
class ServeOptions:
    """Everything ``deltakit serve`` takes besides the base model.

    ``adapters``: name -> adapter directory, served from the start (their directories become
    allowed roots). ``adapter_dirs``: directories ``/v1/load_lora_adapter`` may load from.
    ``resident``: adapters attached at once (the device tier); ``host_resident``: detached ones
    kept in host memory; ``prefetch``: queued requests whose adapters are read from disk ahead of
    their admission (0: off)."""

    adapters: Mapping[str, str] = field(default_factory=dict)
    adapter_dirs: Sequence[str] = ()
    library: str | None = None
    api_key: str | None = None
    limits: Limits = field(default_factory=Limits)
    resident: int = 8
    host_resident: int = 32
    prefetch: int = 4
    strict_base: bool = True
    drain_timeout: float = 60.0


def context_length(model: nn.Module) -> int | None:
    """The longest sequence the model's positions cover (None: not recorded)."""
    n = getattr(getattr(model, "config", None), "max_position_embeddings", None)
    return int(n) if isinstance(n, int) and n > 0 else None


def build_app(model: nn.Module, tokenizer: Any, base_name: str, options: ServeOptions = ServeOptions(), *,
              base_path: str | None = None):
    """The FastAPI app serving ``model`` as ``base_name`` with the given adapters. The adapters
    named in ``options.adapters`` are checked now (manifest, tensor file) and attached on first use."""
    residency = make_residency(model, base_name, options)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    engine = Engine(model, eos_token_ids=eos_ids(model, tokenizer), pad_token_id=int(pad or 0),
                    limits=options.limits, residency=residency, context_length=context_length(model),
                    prefetch=options.prefetch)
    return create_app(engine, residency, tokenizer, base_name=base_name, api_key=options.api_key,
                      base_path=base_path, drain_timeout=options.drain_timeout)


def make_residency(model: nn.Module, base_name: str, options: ServeOptions) -> Residency:
    """The adapter tables for ``options`` (library, allowed roots, the adapters served from the start)."""
    library = None
    if options.library is not None:
        from ..library import AdapterLibrary
        if not Path(options.library).is_dir():
            raise FileNotFoundError(f"--library {options.library}: expected a library directory, found nothing")
        library = AdapterLibrary(options.library)
    residency = Residency(model, roots=list(options.adapter_dirs), library=library, capacity=options.resident,
                          host_capacity=options.host_resident, strict_base=options.strict_base)
    for name, path in options.adapters.items():
        if name == base_name:
            raise ValueError(f"adapter name {name!r} is the base model's name; pick another")
        # a relative path means relative to the working directory here (it names a directory
        # given on the command line); only request-time paths are relative to the roots
        path = Path(path).absolute()
        residency.allow(path)
        residency.register(name, path)
    return residency


class LiveServer:
    """uvicorn serving ``app`` on 127.0.0.1 in a background thread; ``port=0`` picks a free one.
    Stopping is graceful: uvicorn stops accepting, waits for open requests, then the app's
    lifespan drains the engine."""

    def __init__(self, app, host: str = "127.0.0.1", port: int = 0, log_level: str = "warning"):
        import uvicorn
        self.config = uvicorn.Config(app, host=host, port=port, log_level=log_level, lifespan="on",
                                     timeout_graceful_shutdown=None)
        self.server = uvicorn.Server(self.config)
        self.thread = threading.Thread(target=self.server.run, name="deltakit-uvicorn", daemon=True)

    def start(self, timeout: float = 30.0) -> LiveServer:
        self.thread.start()
        end = time.monotonic() + timeout
        while not self.server.started:
            if not self.thread.is_alive() or time.monotonic() > end:
                raise RuntimeError(f"the server did not start within {timeout} s")
            time.sleep(0.02)
        return self

    @property
    def port(self) -> int:
        return self.server.servers[0].sockets[0].getsockname()[1]

    @property
    def url(self) -> str:
        return f"http://{self.config.host}:{self.port}"

    def stop(self, timeout: float = 30.0) -> None:
        self.server.should_exit = True
        self.thread.join(timeout)
        if self.thread.is_alive():
            raise RuntimeError(f"the server did not stop within {timeout} s")

    def __enter__(self) -> LiveServer:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()
