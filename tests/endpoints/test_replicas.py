"""One remote endpoint ("pool", engine "openai") over TWO upstream replicas of different kinds:

    A  a second `modelyard serve` (smollm2-135m)
    B  llama-cpp-python's own OpenAI server (`python -m llama_cpp.server`, same GGUF)

Requests are balanced over both; killing A (by PID) mid-test leaves B serving; killing both makes
the endpoint answer 400 naming the replicas and /ready 503; restarting one makes the endpoint
ready again with no restart of the gateway (the proxy probes replicas every 2 s).
Every process listens on loopback only and is stopped by its PID.
"""

from __future__ import annotations

import os
import sys
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import httpx
import pytest

from testkit.servers import ServerProcess, free_port, modelyard_process, status_is, wait_for, wait_ready
from testkit.until import until

from modelyard import settings as settings_mod
from modelyard.proxy.engine import ProxyEngine
from modelyard.proxy.replicas import SLOW_PROBES_TO_DOWN
from modelyard.settings import EndpointSpec
from modelyard.store import ModelStore

KEY = "replicas-key"
MODEL = "smollm2-135m"
POOL = "pool"
RECOVERY_TIMEOUT = 15.0      # the proxy probes every 2 s; this leaves room on a loaded machine
PROMPT = "The capital of France is"


# -- processes ------------------------------------------------------------------------------------

def served_by_a(a: ServerProcess) -> int:
    """Completions that modelyard replica A answered (its structured request log)."""
    return a.log_text().count('"route": "/v1/completions", "status": 200')


def served_by_b(b: ServerProcess) -> int:
    """Completions that llama-cpp-python's server answered (uvicorn's access log)."""
    return b.log_text().count('"POST /v1/completions HTTP/1.1" 200')


@dataclass
class Stack:
    a: ServerProcess
    b: ServerProcess
    gateway: ServerProcess
    tmp: Path

    @property
    def urls(self) -> tuple[str, str]:
        return self.a.base + "/v1", self.b.base + "/v1"


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    # llama-cpp-python's server needs these (dev extras); without them the process tests skip.
    for mod in ("sse_starlette", "starlette_context", "pydantic_settings"):
        pytest.importorskip(mod)
    tmp = tmp_path_factory.mktemp("replicas")
    model_path = ModelStore(settings_mod.load(env=os.environ).store_dir, progress=False).resolve(MODEL)
    a = modelyard_process(tmp, f'[server]\nlog_level = "info"\n\n[[endpoints]]\nname = "{MODEL}"\n'
                               f'model = "{MODEL}"\ncontext = 512\nparallel = 2\nthreads = 1\n', name="replica-a")
    port_b = free_port()
    b = ServerProcess([sys.executable, "-m", "llama_cpp.server", "--model", str(model_path),
                       "--host", "127.0.0.1", "--port", str(port_b), "--n_ctx", "1024", "--n_threads", "1",
                       "--verbose", "False",
                       # Its default (True) ends a stream with [DONE] and no finish_reason as soon as any
                       # other request waits for the model -- our health probe included.
                       "--interrupt_requests", "False"],
                      port_b, tmp / "replica-b.log")
    gw = modelyard_process(tmp, f"""\
[server]
api_keys = ["{KEY}"]
log_level = "info"

[[endpoints]]
name = "{POOL}"
engine = "openai"
urls = ["{a.base}/v1", "{b.base}/v1"]
upstream_model = "{MODEL}"
timeout = 60
""", name="gateway", key=KEY, model=POOL)
    procs = [a, b, gw]
    try:
        a.start()
        b.start()
        wait_ready(a, "replica A (modelyard) ready")
        wait_for("replica B (llama_cpp.server) answers /v1/models", status_is(b.base + "/v1/models"), b)
        gw.start()
        wait_ready(gw, "gateway ready")
        yield Stack(a, b, gw, tmp)
    finally:
        for p in reversed(procs):
            p.stop()


@pytest.fixture(scope="module")
def api(stack: Stack) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=stack.gateway.base, headers={"Authorization": f"Bearer {KEY}"},
                      timeout=60) as c:
        yield c


def complete(api: httpx.Client, max_tokens: int = 6, **extra) -> httpx.Response:
    return api.post("/api/v1/compatibility/openai/v1/completions",
                    json={"model": POOL, "prompt": PROMPT, "max_tokens": max_tokens, "temperature": 0, **extra})


def replicas(api: httpx.Client) -> dict[str, dict]:
    r = api.get(f"/api/v1/endpoints/{POOL}")
    assert r.status_code == 200, r.text
    return {x["url"]: x for x in r.json()["replicas"]}


# -- the tests (in order: the last one kills and restarts replicas) --------------------------------

@pytest.mark.model
def test_both_replicas_serve(stack, api):
    until(lambda: all(x["healthy"] for x in replicas(api).values()), 10, "both replicas healthy")
    a0, b0 = served_by_a(stack.a), served_by_b(stack.b)
    for _ in range(6):
        r = complete(api)
        assert r.status_code == 200, r.text
        body = r.json()
        assert body["model"] == POOL and body["choices"][0]["text"]
        assert body["usage"]["completion_tokens"] >= 1
    # Equal load ties are broken in turn, so six sequential requests land on both replicas.
    until(lambda: served_by_a(stack.a) > a0 and served_by_b(stack.b) > b0, 5,
          "each replica logged some of the requests")
    assert (served_by_a(stack.a) - a0) + (served_by_b(stack.b) - b0) == 6
    assert set(replicas(api)) == set(stack.urls)
    # llama_cpp.server answers /v1/models only between generations; on a loaded machine a probe
    # can wait past its 2 s timeout and mark B down until the next probe, so allow a few.
    until(lambda: all(x["healthy"] and x["last_error"] is None and x["in_flight"] == 0
                      for x in replicas(api).values()), 10, "both replicas healthy and idle")


@pytest.mark.model
def test_concurrent_streams_spread_by_in_flight(stack, api):
    """Two streams at once: the second goes to the replica with fewer requests in flight. The
    streams are long (256 tokens) and are closed early, which must abort them upstream too."""
    opened = [threading.Event(), threading.Event()]
    release = threading.Event()
    results: list[object] = [None, None]

    def stream(i: int) -> None:
        try:
            with api.stream("POST", "/api/v1/compatibility/openai/v1/completions",
                            json={"model": POOL, "prompt": "Once upon a time", "max_tokens": 256,
                                  "temperature": 0, "stream": True}) as r:
                lines = r.iter_lines()    # keep it: closing this generator closes the connection
                first = next((ln for ln in lines if ln.startswith("data: {")), None)
                results[i] = (r.status_code, first is not None and '"model":"pool"' in first)
                opened[i].set()
                release.wait(30)          # then leave: the client goes away mid-stream
        except Exception as exc:  # noqa: BLE001 - reported below
            results[i] = exc
        finally:
            opened[i].set()

    threads = [threading.Thread(target=stream, args=(i,), daemon=True) for i in range(2)]
    threads[0].start()
    assert opened[0].wait(60), "the first stream did not start"
    threads[1].start()          # the proxy counts it in flight as soon as it picks a replica
    seen: list[dict] = []
    try:
        def one_each() -> bool:
            seen.append({url: x["in_flight"] for url, x in replicas(api).items()})
            return seen[-1] == {url: 1 for url in stack.urls}
        until(one_each, 10, "one stream in flight on each replica", interval=0.05)
        assert opened[1].wait(60), "the second stream did not start"
    finally:
        release.set()
        for t in threads:
            t.join(60)
    assert results == [(200, True), (200, True)], results
    assert seen and seen[-1] == {url: 1 for url in stack.urls}, seen
    # The clients left: the gateway closes both upstream streams and frees its counters.
    until(lambda: all(x["in_flight"] == 0 for x in replicas(api).values()), 15, "in_flight back to 0")


@pytest.mark.model
def test_failover_outage_and_recovery(stack, api):
    url_a, url_b = stack.urls
    gateway_pid = stack.gateway.proc.pid
    # llama_cpp.server answers /v1/models only between generations, so a probe during a long one
    # times out and marks B down until the next probe: start from both healthy.
    until(lambda: all(x["healthy"] for x in replicas(api).values()), 10, "both replicas healthy")

    # 1. A dies. The proxy may still think it healthy (next probe within 2 s): a request sent
    #    there fails to connect, and is retried on B. Every request succeeds.
    stack.a.kill()
    b0 = served_by_b(stack.b)
    for _ in range(4):
        r = complete(api)
        assert r.status_code == 200, r.text
        assert r.json()["model"] == POOL
    until(lambda: served_by_b(stack.b) - b0 == 4, 5, "B logged all four")
    until(lambda: not replicas(api)[url_a]["healthy"], 10, "A marked down")
    reps = replicas(api)
    assert reps[url_b]["healthy"] is True
    assert reps[url_a]["last_error"], reps
    assert httpx.get(stack.gateway.base + "/ready", timeout=5).status_code == 200   # B still serves

    # 2. B dies too: 400 naming the replicas (whether or not a probe has seen B go yet), /ready 503.
    stack.b.kill()
    r = complete(api)
    assert r.status_code == 400, r.text
    message = r.json()["error"]["message"]
    assert url_a in message and url_b in message, message
    until(lambda: not replicas(api)[url_b]["healthy"], 10, "B marked down")
    r = complete(api)
    assert r.status_code == 400, r.text
    err = r.json()["error"]
    assert err["type"] == "model_not_ready" and url_a in err["message"] and url_b in err["message"], err
    ready = httpx.get(stack.gateway.base + "/ready", timeout=5)       # open: states only
    assert ready.status_code == 503, ready.text
    assert ready.json()["not_ready"] == {POOL: "unavailable"}, ready.text
    ready = httpx.get(stack.gateway.base + "/ready", headers=stack.gateway.headers, timeout=5)
    assert POOL in ready.json()["not_ready"] and url_a in ready.json()["not_ready"][POOL]
    desc = api.get(f"/api/v1/endpoints/{POOL}").json()
    assert desc["ready"] is False and url_b in desc["reason"], desc
    assert httpx.get(stack.gateway.base + "/health", timeout=5).status_code == 200  # the process is fine

    # 3. A comes back on the same port: the gateway notices on its own.
    stack.a.start(stack.tmp / "replica-a-restarted.log")
    wait_ready(stack.a, "replica A ready again")
    until(lambda: httpx.get(stack.gateway.base + "/ready", timeout=5).status_code == 200, RECOVERY_TIMEOUT,
          "gateway ready again")
    r = complete(api)
    assert r.status_code == 200, r.text
    assert r.json()["model"] == POOL and r.json()["choices"][0]["text"]
    until(lambda: served_by_a(stack.a) == 1, 5, "restarted A served it")
    reps = replicas(api)
    assert reps[url_a]["healthy"] is True and reps[url_b]["healthy"] is False, reps
    assert stack.gateway.proc.pid == gateway_pid and stack.gateway.proc.poll() is None


# -- the health rule behind the tests above, in process (no model) -----------------------------

def test_a_slow_probe_is_busy_a_refused_one_is_down():
    """A replica that accepts the probe but answers late (llama_cpp.server while it generates)
    stays in rotation until SLOW_PROBES_TO_DOWN such probes in a row; a refused one is out at once."""
    import asyncio

    mode = {"a": "ok", "b": "ok"}

    def upstream(request: httpx.Request) -> httpx.Response:
        what = mode[request.url.host]
        if what == "slow":
            raise httpx.ReadTimeout("timed out", request=request)
        if what == "refused":
            raise httpx.ConnectError("connection refused", request=request)
        return httpx.Response(200, json={"object": "list", "data": []})

    async def scenario() -> None:
        spec = EndpointSpec(name="pool", engine="openai", urls=("http://a:1/v1", "http://b:2/v1"))
        engine = ProxyEngine(spec, httpx.MockTransport(upstream), health_interval=3600)
        await engine.start()
        try:
            health = lambda: {r["url"][7]: r["healthy"] for r in engine.status()["replicas"]}  # noqa: E731
            assert health() == {"a": True, "b": True}
            mode["a"], mode["b"] = "slow", "refused"
            for _ in range(SLOW_PROBES_TO_DOWN - 1):
                await engine.probe_all()
                assert health() == {"a": True, "b": False}
            await engine.probe_all()                       # the last slow probe in a row
            assert health() == {"a": False, "b": False}
            assert "ReadTimeout" in engine.ready_reason() and "refused" in engine.ready_reason()
            mode["a"] = "ok"
            await engine.probe_all()
            assert health()["a"] is True and engine.status()["replicas"][0]["slow_probes"] == 0
            mode["a"] = "slow"                             # a slow answer after a good one: still up
            await engine.probe_all()
            assert health()["a"] is True
            mode["a"] = "ok"
            await engine.probe_all()                       # and the count starts over
            assert engine.status()["replicas"][0]["slow_probes"] == 0
        finally:
            await engine.stop()

    asyncio.run(scenario())
