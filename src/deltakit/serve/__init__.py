"""Serving many adapters on one base: continuous batching across adapters, residency tiers,
and an OpenAI-compatible HTTP API (``deltakit serve``).

* :mod:`.engine`: the scheduler thread that owns the model (continuous batching, mixed adapters);
* :mod:`.residency`: which adapters are attached, kept in host memory, or on disk;
* :mod:`.api`: the FastAPI app (completions, chat, models, LoRA load / unload, health, metrics);
* :mod:`.server`: assembling the app from options and running it with uvicorn.

The HTTP parts need the ``serve`` extra (FastAPI, uvicorn, prometheus_client); the engine and
residency need only torch.
"""
from .engine import Engine, EngineClosed, Event, Limits, QueueFull, Request
from .residency import PathNotAllowed, Residency, Resolved, UnknownAdapter

__all__ = ["Engine", "EngineClosed", "Event", "Limits", "QueueFull", "Request",
           "Residency", "Resolved", "UnknownAdapter", "PathNotAllowed"]
