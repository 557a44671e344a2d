"""The Live page's time series: a small in-process sampler of the counters /metrics exports.

Every INTERVAL seconds it reads this app's Prometheus registry (the same families a scrape sees:
modelyard_requests, modelyard_completion_tokens, the TTFT histogram, modelyard_queue_depth) and
keeps the last KEEP snapshots. Rates and latencies are differences between snapshots, so the
console shows what /metrics would show a Prometheus server over the same minutes, and nothing
in the request path changes for it.
"""

from __future__ import annotations

import logging
import math
import time
from collections import deque
from dataclasses import dataclass, field

from ..periodic import Periodic

log = logging.getLogger("modelyard.console")
INTERVAL = 1.0          # seconds between samples (the Live page refreshes every 2 s)
KEEP = 300              # samples: five minutes


@dataclass
class Counts:
    requests: float = 0.0
    throttled: float = 0.0          # 429
    errors: float = 0.0             # 5xx
    tokens: float = 0.0             # completion tokens
    ttft_sum: float = 0.0
    ttft_count: float = 0.0
    ttft_buckets: dict[float, float] = field(default_factory=dict)     # le -> cumulative count
    queue: float = 0.0


@dataclass
class Sample:
    at: float                       # unix seconds
    endpoints: dict[str, Counts]


def read(prom) -> dict[str, Counts]:
    """One snapshot of every endpoint's counters from a prometheus_client registry."""
    out: dict[str, Counts] = {}
    for family in prom.collect():
        for s in family.samples:
            ep = s.labels.get("endpoint")
            if ep is None or ep in ("-", "unknown"):
                continue
            c = out.setdefault(ep, Counts())
            if s.name == "modelyard_requests_total":
                c.requests += s.value
                status = s.labels.get("status", "")
                if status == "429":
                    c.throttled += s.value
                elif status.startswith("5"):
                    c.errors += s.value
            elif s.name == "modelyard_completion_tokens_total":
                c.tokens += s.value
            elif s.name == "modelyard_time_to_first_token_seconds_sum":
                c.ttft_sum += s.value
            elif s.name == "modelyard_time_to_first_token_seconds_count":
                c.ttft_count += s.value
            elif s.name == "modelyard_time_to_first_token_seconds_bucket":
                c.ttft_buckets[float(s.labels["le"])] = s.value
            elif s.name == "modelyard_queue_depth":
                c.queue += s.value
    return out


def quantile(q: float, before: dict[float, float], after: dict[float, float]) -> float | None:
    """Prometheus's histogram_quantile over the observations between two snapshots (linear
    within the bucket); None when there were none. The +Inf bucket answers its lower bound."""
    bounds = sorted(after)
    counts = [after[b] - before.get(b, 0.0) for b in bounds]
    if not counts or counts[-1] <= 0:
        return None
    rank = q * counts[-1]
    lower, below = 0.0, 0.0
    for bound, cumulative in zip(bounds, counts):
        if cumulative >= rank:
            if math.isinf(bound):
                return lower
            inside = cumulative - below
            return lower + (bound - lower) * ((rank - below) / inside if inside else 1.0)
        lower, below = bound, cumulative
    return lower


SERIES = ("requests", "tokens", "ttft", "queue", "throttled", "errors")


class Sampler:
    def __init__(self, app, interval: float = INTERVAL, keep: int = KEEP) -> None:
        self.app, self.interval = app, interval
        self.samples: deque[Sample] = deque(maxlen=keep)
        self._task: Periodic | None = None

    def sample(self) -> None:
        metrics = getattr(self.app.state, "metrics", None)
        if metrics is not None:
            self.samples.append(Sample(time.time(), read(metrics.prom)))

    async def start(self) -> None:
        self.sample()
        self._task = Periodic("console-sampler", self.interval, self.sample, log=log, traceback=True,
                              failure="console sampler: reading the metrics failed")
        self._task.start()

    async def stop(self) -> None:
        if self._task is not None:
            await self._task.stop()

    def series(self, endpoint: str) -> dict[str, list[tuple[float, float | None]]]:
        """Per sample interval: requests/s, tokens/s, mean TTFT (s), queue depth, 429/s, 5xx/s."""
        out: dict[str, list[tuple[float, float | None]]] = {k: [] for k in SERIES}
        samples = list(self.samples)
        for prev, cur in zip(samples, samples[1:]):
            a, b = prev.endpoints.get(endpoint, Counts()), cur.endpoints.get(endpoint, Counts())
            dt = max(cur.at - prev.at, 1e-6)
            n = b.ttft_count - a.ttft_count
            out["requests"].append((cur.at, max(b.requests - a.requests, 0.0) / dt))
            out["tokens"].append((cur.at, max(b.tokens - a.tokens, 0.0) / dt))
            out["ttft"].append((cur.at, (b.ttft_sum - a.ttft_sum) / n if n > 0 else None))
            out["queue"].append((cur.at, b.queue))
            out["throttled"].append((cur.at, max(b.throttled - a.throttled, 0.0) / dt))
            out["errors"].append((cur.at, max(b.errors - a.errors, 0.0) / dt))
        return out

    def summary(self, endpoint: str, window: float = 60.0) -> dict[str, float | None]:
        """tokens/s and TTFT p50/p95 over the last `window` seconds (the Endpoints table)."""
        samples = list(self.samples)
        if len(samples) < 2:
            return {"tokens_per_s": None, "ttft_p50": None, "ttft_p95": None}
        last = samples[-1]
        first = next((s for s in samples if s.at >= last.at - window), samples[0])
        if first is last:
            first = samples[-2]
        a, b = first.endpoints.get(endpoint, Counts()), last.endpoints.get(endpoint, Counts())
        return {"tokens_per_s": max(b.tokens - a.tokens, 0.0) / max(last.at - first.at, 1e-6),
                "ttft_p50": quantile(0.5, a.ttft_buckets, b.ttft_buckets),
                "ttft_p95": quantile(0.95, a.ttft_buckets, b.ttft_buckets)}
