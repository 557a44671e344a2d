"""proxy/load: each engine's /metrics text → its running + waiting requests; and the pool using
it (a MockTransport upstream: pure logic of the wiring, the real servers are tests/endpoints')."""

from __future__ import annotations

import httpx
import pytest

from modelyard.proxy.load import engine_load, metrics_url
from modelyard.proxy.replicas import ReplicaPool, Route
from modelyard.settings import EndpointSpec

VLLM = """# HELP vllm:num_requests_running Number of requests in model execution batches.
# TYPE vllm:num_requests_running gauge
vllm:num_requests_running{engine="0",model_name="m"} 3.0
# HELP vllm:num_requests_waiting Number of requests waiting to be processed.
# TYPE vllm:num_requests_waiting gauge
vllm:num_requests_waiting{engine="0",model_name="m"} 4.0
# TYPE vllm:prompt_tokens counter
vllm:prompt_tokens_total{model_name="m"} 1234.0
"""
SGLANG = """# TYPE sglang:num_running_reqs gauge
sglang:num_running_reqs{model_name="m"} 2
# TYPE sglang:num_queue_reqs gauge
sglang:num_queue_reqs{model_name="m"} 1
"""
LLAMA = """# HELP llamacpp:requests_processing Number of requests processing.
# TYPE llamacpp:requests_processing gauge
llamacpp:requests_processing 1
# HELP llamacpp:requests_deferred Number of requests deferred.
# TYPE llamacpp:requests_deferred gauge
llamacpp:requests_deferred 5
"""
MODELYARD = """# TYPE modelyard_in_flight gauge
modelyard_in_flight{endpoint="a"} 2.0
modelyard_in_flight{endpoint="b"} 1.0
# TYPE modelyard_queue_depth gauge
modelyard_queue_depth{endpoint="a"} 1.0
"""


@pytest.mark.parametrize("text, load", [(VLLM, 7), (SGLANG, 3), (LLAMA, 6), (MODELYARD, 3),
                                        ("# TYPE other gauge\nother 9\n", None), ("", None)])
def test_engine_load(text, load):
    assert engine_load(text) == load


def test_metrics_url_is_at_the_root():
    assert metrics_url("http://u:p@h:8000/v1") == "http://u:p@h:8000/metrics"
    assert metrics_url("https://h/api/v1/compatibility/openai/v1") == "https://h/metrics"


@pytest.fixture
def anyio_backend():
    return "asyncio"


@pytest.mark.anyio
async def test_the_pool_spills_by_engine_load_and_records_prefixes():
    loads = {"a": 0, "b": 0, "c": 0}
    sent: list[str] = []

    def handle(request: httpx.Request) -> httpx.Response:
        host = request.url.host
        if request.url.path.endswith("/models"):
            return httpx.Response(200, json={"data": []})
        if request.url.path == "/metrics":
            return httpx.Response(200, text=f"# TYPE vllm:num_requests_running gauge\n"
                                            f"vllm:num_requests_running {loads[host]}\n")
        sent.append(host)
        return httpx.Response(200, json={})

    spec = EndpointSpec(name="f", engine="openai", urls=("http://a/v1", "http://b/v1", "http://c/v1"),
                        balance="prefix", balance_abs_threshold=2, balance_rel_threshold=1.5)
    pool = ReplicaPool(spec, httpx.MockTransport(handle), health_interval=3600)
    await pool.start()
    try:
        text = "A long shared system prompt. " * 10
        replica, resp = await pool.send("/completions", {"prompt": text}, None, Route(text + "one"))
        await resp.aclose()
        replica.in_flight -= 1
        home = replica.url
        for i in range(3):
            replica, resp = await pool.send("/completions", {}, None, Route(text + f"q{i}"))
            await resp.aclose()
            replica.in_flight -= 1
            assert replica.url == home
        [first] = [r for r in pool.replicas if r.url == home]
        assert first.requests == 4 and first.prefix_hit_blocks >= 3 * (len(text) // 64)
        # its engine reports 9 running, the others 0: spilled
        loads[httpx.URL(home).host] = 9
        await pool.probe_all()
        assert first.load == 9
        replica, resp = await pool.send("/completions", {}, None, Route(text + "q9"))
        await resp.aclose()
        replica.in_flight -= 1
        assert replica.url != home and first.overload_spills == 1
        status = pool.status()
        assert status["balance"] == "prefix" and [r["index"] for r in status["replicas"]] == [0, 1, 2]
        assert [r["load"] for r in status["replicas"]].count(9) == 1
    finally:
        await pool.stop()


def test_without_engine_metrics_the_load_is_this_gateways_count():
    from modelyard.proxy.replicas import Replica
    r = Replica("http://x/v1", in_flight=2)
    assert r.load == 2
    r.engine_load, r.in_flight_at_scrape = 5.0, 1
    assert r.load == 6          # the engine's figure, plus what was sent since it was read
