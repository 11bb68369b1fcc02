"""Prometheus metrics of one server: requests and tokens per adapter, latency histograms, queue
depth, running rows, the adapters resident in each tier (also split by kind: adapter directory
or compressed task vector), where each admission found its adapter, and the prefetch reads.

A registry per server (not prometheus_client's global one), so two servers in one process
(tests, a benchmark) keep separate counts. The ``adapter`` label is the served name (the base's
name, an adapter name or ``name@version``), never the raw text a client sent: an unknown name
is counted as ``adapter=""``, so clients cannot grow the label set.
"""
from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

__all__ = ["Metrics", "CONTENT_TYPE"]

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
_LATENCY = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120)


class _Tiers:
    """Reads the residency tables when scraped (no copy to keep in sync)."""

    def __init__(self, residency) -> None:
        self.residency = residency

    def collect(self):
        g = GaugeMetricFamily("deltakit_resident_adapters", "Adapters held in each residency tier", labels=["tier"])
        for tier, n in self.residency.tiers().items():
            g.add_metric([tier], n)
        yield g
        k = GaugeMetricFamily("deltakit_resident_adapters_by_kind", "Adapters held in each residency tier, by "
                              "what they are at rest (adapter directory or compressed task vector)",
                              labels=["tier", "kind"])
        for (tier, kind), n in sorted(self.residency.tiers_by_kind().items()):
            k.add_metric([tier, kind], n)
        yield k
        loads = CounterMetricFamily("deltakit_adapter_admissions", "Admissions by where the adapter was: device, "
                                    "host (an evicted copy), prefetched (a prefetch hit), waited (its prefetch was "
                                    "still reading), disk (read at admission)", labels=["source"])
        for where in ("device", "host", "prefetched", "waited", "disk"):
            loads.add_metric([where], self.residency.loads[where])
        yield loads
        pre = CounterMetricFamily("deltakit_prefetch_reads", "Prefetch reads by outcome: started, failed, dropped "
                                  "(unloaded first), evicted (pushed out of the host tier before use)",
                                  labels=["outcome"])
        for outcome in ("started", "failed", "dropped", "evicted"):
            pre.add_metric([outcome], self.residency.prefetches[outcome])
        yield pre


class Metrics:
    """The server's counters; :meth:`finished` records one request."""

    def __init__(self, engine, residency) -> None:
        r = self.registry = CollectorRegistry()
        self.requests = Counter("deltakit_requests", "Requests answered, by adapter and outcome "
                                "(finish reason or HTTP status)", ["adapter", "status"], registry=r)
        self.tokens = Counter("deltakit_tokens", "Tokens by adapter and kind (prompt / completion)",
                              ["adapter", "kind"], registry=r)
        self.latency = Histogram("deltakit_request_latency_seconds", "Seconds from arrival to the last token",
                                 ["adapter"], buckets=_LATENCY, registry=r)
        self.first = Histogram("deltakit_time_to_first_token_seconds", "Seconds from arrival to the first token",
                               ["adapter"], buckets=_LATENCY, registry=r)
        Gauge("deltakit_queue_depth", "Requests waiting for a batch row", registry=r).set_function(
            lambda: engine.queue_depth)
        Gauge("deltakit_running_requests", "Requests in the running batch", registry=r).set_function(
            lambda: engine.running)
        r.register(_Tiers(residency))

    def finished(self, adapter: str, status: str, prompt: int, completion: int, seconds: float,
                 first: float | None) -> None:
        self.requests.labels(adapter, status).inc()
        self.tokens.labels(adapter, "prompt").inc(prompt)
        self.tokens.labels(adapter, "completion").inc(completion)
        self.latency.labels(adapter).observe(seconds)
        if first is not None:
            self.first.labels(adapter).observe(first)

    def refused(self, adapter: str, status: int) -> None:
        self.requests.labels(adapter, str(status)).inc()

    def text(self) -> bytes:
        return generate_latest(self.registry)
