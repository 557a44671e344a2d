"""The Live page's numbers: the sampler reads the same Prometheus counters /metrics exports
(a real Metrics object), and its rates, TTFT quantiles and charts follow them."""

from __future__ import annotations

import time
from types import SimpleNamespace

from modelyard.console.charts import chart, nice_max
from modelyard.console.sampler import Sampler, quantile, read
from modelyard.metrics import Metrics


class _Registry:
    """The two things Metrics asks of a registry: endpoint names, and (scrape time) the endpoints."""

    def __init__(self, names):
        self.endpoints = {n: _Endpoint(n) for n in names}


class _Endpoint:
    def __init__(self, name):
        from modelyard.registry.endpoint import EndpointState
        self.name, self.state, self.engine = name, EndpointState.READY, _Engine()
        # what the lifecycle's series read (registry/endpoint): loaded since start, never used
        self.loaded, self.resident, self.pending, self.counts = True, None, 0, {}
        self.spec = SimpleNamespace(engine="llamacpp")

    def not_ready_reason(self):
        return None


class _Engine:
    queue = 0

    def status(self):
        return {"queue_depth": self.queue, "in_flight": 0}


class _App:
    class state:
        pass


def test_rates_and_quantiles_follow_the_counters():
    registry = _Registry(["a", "b"])
    metrics = Metrics(registry, ["/v1/completions"])
    app = _App()
    app.state.metrics = metrics
    sampler = Sampler(app)
    sampler.sample()
    for status in (200, 200, 429, 503):
        metrics.request("a", "/v1/completions", status, 0.1, {})
    started = time.monotonic()
    for ttft in (0.02, 0.04, 0.3):
        metrics.tokens("a", 5, 10)                     # what the request's ledger settles
        metrics.generation("a", started, started + ttft, 10)
    registry.endpoints["a"].engine.queue = 3
    sampler.sample()
    snap = read(metrics.prom)
    assert snap["a"].requests == 4 and snap["a"].throttled == 1 and snap["a"].errors == 1
    assert snap["a"].tokens == 30 and snap["a"].ttft_count == 3 and snap["a"].queue == 3
    assert snap["b"].requests == 0
    s = sampler.series("a")
    dt = sampler.samples[1].at - sampler.samples[0].at
    assert abs(s["requests"][-1][1] - 4 / dt) < 1e-6 and abs(s["throttled"][-1][1] - 1 / dt) < 1e-6
    assert abs(s["tokens"][-1][1] - 30 / dt) < 1e-6 and s["queue"][-1][1] == 3
    assert abs(s["ttft"][-1][1] - 0.36 / 3) < 1e-9
    assert sampler.series("b")["ttft"][-1][1] is None               # no requests: no TTFT, not 0
    summary = sampler.summary("a")
    assert 0.025 <= summary["ttft_p50"] <= 0.05                      # 2nd of 3 in the (0.025, 0.05] bucket
    assert 0.25 <= summary["ttft_p95"] <= 0.5


def test_quantile_interpolates_like_prometheus():
    after = {0.1: 5.0, 0.5: 10.0, float("inf"): 10.0}
    assert quantile(0.5, {}, after) == 0.1
    assert abs(quantile(0.75, {}, after) - 0.3) < 1e-9
    assert quantile(0.5, after, after) is None                      # nothing observed in between
    assert quantile(0.99, {}, {1.0: 0.0, float("inf"): 4.0}) == 1.0  # +Inf answers its lower bound


def test_chart_scales_and_gaps():
    assert [nice_max(v) for v in (0, 0.3, 1, 3, 7, 12, 450)] == [1.0, 0.5, 1, 5, 10, 20, 500]
    c = chart([(100.0, 1.0), (101.0, None), (102.0, 4.0), (103.0, 2.0)], "requests/s", "", 10)
    assert len(c["lines"]) == 2                                      # the None is a gap
    assert c["latest"] == "2.0" and c["top"] == "5.0" and "latest 2.0" in c["label"]
    assert chart([], "x", "s", 60)["lines"] == []
