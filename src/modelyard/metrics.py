"""Prometheus metrics (prometheus-client), one CollectorRegistry per app so tests can make many.

Counters and histograms are updated as requests end; endpoint state, queue depth and in-flight
are read from the registry at scrape time, so they can never drift from the truth.
"""

from __future__ import annotations

import json
import logging
import time
from typing import TYPE_CHECKING, Iterable

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from starlette.routing import compile_path

if TYPE_CHECKING:
    from .registry.registry import Registry

log = logging.getLogger("modelyard.requests")

# Label values come only from the app's own routes and the configured endpoint names: a path
# or a model name chosen by a client would make one time series per value (unbounded memory
# and scrapes). Everything else is counted in these buckets.
OTHER_ROUTE = "other"
UNKNOWN_ENDPOINT = "unknown"
NO_ENDPOINT = "-"          # routes that name no endpoint (/models, /api/v1/endpoints)

LATENCY = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120)
PER_TOKEN = (0.002, 0.005, 0.01, 0.02, 0.04, 0.08, 0.16, 0.32, 0.64, 1.28)


class Metrics:
    def __init__(self, registry: "Registry", routes: Iterable[str] = ()) -> None:
        self.registry = registry
        self.route_label = RouteLabels(routes)
        self.prom = CollectorRegistry()
        self.requests = Counter("modelyard_requests", "HTTP requests by endpoint, route and status",
                                ["endpoint", "route", "status"], registry=self.prom)
        self.prompt_tokens = Counter("modelyard_prompt_tokens", "Prompt tokens processed (requests cut short included)",
                                     ["endpoint"], registry=self.prom)
        self.completion_tokens = Counter("modelyard_completion_tokens", "Tokens generated",
                                         ["endpoint"], registry=self.prom)
        self.embedding_inputs = Counter("modelyard_embedding_inputs", "Inputs embedded (one vector each)",
                                        ["endpoint"], registry=self.prom)
        self.ttft = Histogram("modelyard_time_to_first_token_seconds", "Time to first token",
                              ["endpoint"], buckets=LATENCY, registry=self.prom)
        self.tpot = Histogram("modelyard_time_per_output_token_seconds", "Time per output token after the first",
                              ["endpoint"], buckets=PER_TOKEN, registry=self.prom)
        self.latency = Histogram("modelyard_request_duration_seconds", "End-to-end request latency",
                                 ["endpoint", "route"], buckets=LATENCY, registry=self.prom)
        self.prom.register(_EndpointCollector(registry))
        # Prefix-cache series tell whether someone's prompt is cached: a registry of their own,
        # exported only to callers allowed to see them (api/probes.metrics).
        self.cache_prom = CollectorRegistry()
        self.cache_prom.register(_CacheCollector(registry))
        self.quotas = None          # quota/redis.RedisQuotas or quota/postgres.PostgresQuotas when quotas are shared
        self.prom.register(_QuotaCollector(self))
        self.control_sync = None    # control/sync.ControlSync when the control plane is on
        self.prom.register(_ControlCollector(self))

    def tokens(self, endpoint: str, prompt_tokens: int, completion_tokens: int) -> None:
        """What an engine request computed, from its ledger's settle (quota/ledger): finished or
        cut short, the same figures as its usage row."""
        endpoint = self.endpoint_label(endpoint)
        self.prompt_tokens.labels(endpoint).inc(prompt_tokens)
        self.completion_tokens.labels(endpoint).inc(completion_tokens)

    def generation(self, endpoint: str, started: float, first_token: float | None, completion_tokens: int) -> None:
        """Called once per finished generation (streamed or not): its latencies."""
        if first_token is not None:
            self.ttft.labels(endpoint).observe(first_token - started)
            if completion_tokens > 1:
                self.tpot.labels(endpoint).observe((time.monotonic() - first_token) / (completion_tokens - 1))

    def embedding(self, endpoint: str, inputs: int) -> None:
        """Called once per answered /embeddings request (its count and latency are the route's,
        its tokens the ledger's)."""
        self.embedding_inputs.labels(endpoint).inc(inputs)

    def endpoint_label(self, name: str) -> str:
        if name == NO_ENDPOINT or name in self.registry.endpoints:
            return name
        return UNKNOWN_ENDPOINT

    def request(self, endpoint: str, path: str, status: int, seconds: float, extra: dict) -> None:
        """One ended request; `endpoint` (the name the client sent) and `path` are bucketed here."""
        endpoint, route = self.endpoint_label(endpoint), self.route_label(path)
        self.requests.labels(endpoint, route, str(status)).inc()
        self.latency.labels(endpoint, route).observe(seconds)
        # One structured line per request; never the prompt (only ids, sizes and timings).
        log.info(json.dumps({"endpoint": endpoint, "route": route, "status": status,
                             "latency_ms": round(seconds * 1000, 1), **extra}))

    def render(self, cache: bool = False) -> bytes:
        """The exposition text; with `cache`, the prefix-cache series too (distinct names, so
        the two texts concatenate into one valid exposition)."""
        return generate_latest(self.prom) + (generate_latest(self.cache_prom) if cache else b"")


class RouteLabels:
    """Request path -> the template of the app's route that serves it (/api/v1/endpoints/{name}),
    or OTHER_ROUTE. Matched on the path alone: a wrong method on a route counts under it."""

    def __init__(self, templates: Iterable[str]) -> None:
        self._routes = [(compile_path(t)[0], t) for t in templates]

    def __call__(self, path: str) -> str:
        for regex, template in self._routes:
            if regex.match(path):
                return template
        return OTHER_ROUTE


# Structured output (local/grammar.Grammars.status): counters, by endpoint.
GRAMMAR_COUNTERS = {
    "grammar_requests": "Requests with structured output (a grammar per choice)",
    "grammar_compiled": "Grammars compiled (cache misses that compiled)",
    "grammar_cache_hits": "Requests whose grammar was already compiled",
    "grammar_failed": "Constraints refused: invalid, unsupported or too slow to compile",
    "grammar_compile_seconds": "Seconds spent compiling grammars",
    "grammar_masks": "Token masks computed (one per constrained token)",
    "grammar_mask_seconds": "Seconds spent computing and applying token masks",
}


# A remote endpoint's replicas (proxy/replicas.Replica.as_dict): what routing did and saw.
REPLICA_SERIES = {
    "healthy": (GaugeMetricFamily, "1 while the replica answers its health probe"),
    "load": (GaugeMetricFamily, "Requests running and waiting on the replica: its engine's /metrics, plus what "
                                "this gateway sent since; this gateway's in-flight count where it serves none"),
    "requests": (CounterMetricFamily, "Requests this gateway sent to the replica"),
    "overload_spills": (CounterMetricFamily, "Requests whose cache-best (or session) replica this was, sent to "
                                             "the least-loaded one instead: this one was overloaded"),
    "dropped": (CounterMetricFamily, "Connections the replica dropped before answering (a killed engine, a "
                                     "closed keep-alive connection); each request was sent again"),
}
# Prefix-hit estimates say whether a prompt was sent before: with the cache series (_CacheCollector).
REPLICA_CACHE_SERIES = {
    "prefix_hit_blocks": "Blocks of prompt text (64 characters) this gateway had sent to the replica before, "
                         "counted over the requests routed to it: its estimated prefix-cache hits",
    "prefix_hit_chars": "Characters of prompt text this gateway had sent to the replica before "
                        "(prefix_hit_blocks x 64)",
}


class _QuotaCollector:
    """Shared quotas (Redis, PostgreSQL): whether this process is on its local fallback, and how often it was."""

    def __init__(self, metrics: "Metrics") -> None:
        self.metrics = metrics

    def collect(self):
        quotas = self.metrics.quotas
        if quotas is None:
            return
        on = GaugeMetricFamily("modelyard_quota_fallback",
                               "1 while the shared quota store (Redis, PostgreSQL) is unreachable and quotas are this process's share (quota / processes)")
        on.add_metric([], 1.0 if quotas.fallback else 0.0)
        times = CounterMetricFamily("modelyard_quota_fallbacks", "Times this process fell back to local quotas")
        times.add_metric([], float(quotas.fallbacks))
        yield from (on, times)


class _ControlCollector:
    """The control store's freshness: how old this process's view of keys and tokens is, and
    whether stored ones are refused for it (control/sync's fail-closed bound)."""

    def __init__(self, metrics: "Metrics") -> None:
        self.metrics = metrics

    def collect(self):
        sync = self.metrics.control_sync
        if sync is None:
            return
        age = GaugeMetricFamily("modelyard_control_sync_age_seconds",
                                "Seconds since this process last read the control database successfully")
        age.add_metric([], sync.age())
        closed = GaugeMetricFamily("modelyard_control_fail_closed",
                                   "1 while stored API keys and admin tokens are refused: the control database has "
                                   "not answered within control_fail_closed_after")
        closed.add_metric([], 1.0 if sync.stale() is not None else 0.0)
        yield from (age, closed)


# The models' lifecycle (registry/lifecycle), by endpoint: name -> (a counter?, help). The names
# an autoscaler reads (docs/scaling.md: pending, load_waiting) are checked against /metrics.
LIFECYCLE_SERIES = {
    "loaded": (False, "1 while the endpoint's model is loaded"),
    "resident_bytes": (False, "Bytes the loaded model holds (what llama.cpp allocated, with the host prefix cache bound)"),
    "pending": (False, "Requests holding the endpoint: waiting for its load, queued or being served"),
    "load_waiting": (False, "Requests waiting for the endpoint's model to load"),
    "loads": (True, "Model loads"),
    "load_seconds": (True, "Seconds spent loading the model"),
    "unloads": (True, "Model unloads (idle, evicted, an admin's, a reload)"),
    "idle_unloads": (True, "Unloads after keep_alive seconds idle"),
    "evictions": (True, "Unloads to make room for another endpoint under the memory budget"),
    "load_wait_seconds": (True, "Seconds requests spent waiting for a load, summed"),
}


def _lifecycle_value(ep, status: dict, key: str) -> float:
    """One lifecycle series of `ep`; `status` is its engine's, read once per scrape."""
    if key == "loaded":
        return 1.0 if ep.loaded and not status.get("asleep", False) else 0.0     # asleep: a remote upstream
    if key == "resident_bytes":
        return float(ep.resident or 0)
    if key == "pending":
        return float(ep.pending)
    # a remote endpoint on demand (proxy/lifecycle): its upstream's wakes and sleeps, its held requests
    remote = status if ep.spec.engine == "openai" else {}
    if key == "load_waiting":
        return float(ep.counts.get("waiting", 0) + remote.get("wake_waiting", 0))
    extra = {"loads": "wakes", "unloads": "sleeps", "load_wait_seconds": "wake_wait_seconds"}.get(key)
    return float(ep.counts.get(key, 0) + (remote.get(extra, 0) if extra else 0))


class _EndpointCollector:
    def __init__(self, registry: "Registry", routes: Iterable[str] = ()) -> None:
        self.registry = registry
        self.route_label = RouteLabels(routes)

    def collect(self):
        ready = GaugeMetricFamily("modelyard_endpoint_ready", "1 when the endpoint can serve now",
                                  labels=["endpoint", "state"])
        queue = GaugeMetricFamily("modelyard_queue_depth", "Requests waiting for a slot", labels=["endpoint"])
        in_flight = GaugeMetricFamily("modelyard_in_flight", "Requests admitted and not finished",
                                      labels=["endpoint"])
        grammar = {key: CounterMetricFamily(f"modelyard_{key}", doc, labels=["endpoint"])
                   for key, doc in GRAMMAR_COUNTERS.items()}
        preempted = CounterMetricFamily("modelyard_batch_preemptions", "Batch-priority requests preempted (to "
                                        "restart later) for interactive ones, embedded endpoints", labels=["endpoint"])
        # a remote endpoint's replicas (proxy/replicas), labelled by their index in its urls: never a URL
        replica = {key: kind(f"modelyard_replica_{key}", doc, labels=["endpoint", "replica"])
                   for key, (kind, doc) in REPLICA_SERIES.items()}
        lifecycle = {key: (CounterMetricFamily if counter else GaugeMetricFamily)(
                         f"modelyard_endpoint_{key}", doc, labels=["endpoint"])
                     for key, (counter, doc) in LIFECYCLE_SERIES.items()}
        for ep in self.registry.endpoints.values():
            ready.add_metric([ep.name, ep.state.value], 1.0 if ep.not_ready_reason() is None else 0.0)
            status = ep.engine.status() if ep.engine is not None else {}
            for key, family in lifecycle.items():
                family.add_metric([ep.name], _lifecycle_value(ep, status, key))
            queue.add_metric([ep.name], float(status.get("queue_depth", 0)))
            in_flight.add_metric([ep.name], float(status.get("in_flight", 0)))
            for key, family in grammar.items():
                if key in status:
                    family.add_metric([ep.name], float(status[key]))
            if "batch_preemptions" in status:
                preempted.add_metric([ep.name], float(status["batch_preemptions"]))
            for r in status.get("replicas") or ():
                for key, family in replica.items():
                    family.add_metric([ep.name, str(r["index"])], float(r[key]))
        yield from (ready, queue, in_flight, *grammar.values(), preempted, *replica.values(), *lifecycle.values())


class _CacheCollector:
    """The embedded endpoints' host prefix cache (local/prefix_cache.HostCache)."""

    def __init__(self, registry: "Registry") -> None:
        self.registry = registry

    def collect(self):
        host_bytes = GaugeMetricFamily("modelyard_prefix_cache_host_bytes",
                                       "Bytes of prompt KV held in host memory beyond the slots", labels=["endpoint"])
        host_hits = CounterMetricFamily("modelyard_prefix_cache_host_hits",
                                        "Prompts whose prefix KV was restored from host memory", labels=["endpoint"])
        host_tokens = CounterMetricFamily("modelyard_prefix_cache_host_hit_tokens",
                                          "Prompt tokens restored from host memory instead of computed",
                                          labels=["endpoint"])
        replica = {key: CounterMetricFamily(f"modelyard_replica_{key}", doc, labels=["endpoint", "replica"])
                   for key, doc in REPLICA_CACHE_SERIES.items()}
        for ep in self.registry.endpoints.values():
            status = ep.engine.status() if ep.engine is not None else {}
            if "host_cache_bytes" in status:
                host_bytes.add_metric([ep.name], float(status["host_cache_bytes"]))
                host_hits.add_metric([ep.name], float(status["host_cache_hits"]))
                host_tokens.add_metric([ep.name], float(status["host_cache_hit_tokens"]))
            for r in status.get("replicas") or ():
                for key, family in replica.items():
                    family.add_metric([ep.name, str(r["index"])], float(r[key]))
        yield from (host_bytes, host_hits, host_tokens, *replica.values())
