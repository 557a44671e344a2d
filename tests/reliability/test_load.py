"""Load: a burst of 4x the endpoint's bound (parallel 2 + max_queue 4 = 6) of concurrent streaming
requests. The bound holds: each request is either admitted (200, and then it completes with a
finish_reason and [DONE]) or refused at once (503 with Retry-After and the OpenAI error body);
nothing else, no timeout, and afterwards nothing is left in flight and no slot is held."""

from __future__ import annotations

import asyncio
import json
import time

import httpx
import pytest

from helpers import assert_openai_error, check_stream_end, config, live_server, sse_events

pytestmark = pytest.mark.model

PARALLEL, MAX_QUEUE = 2, 4
BOUND = PARALLEL + MAX_QUEUE
BURST = 4 * BOUND
CLIENT_TIMEOUT = httpx.Timeout(60.0, connect=10.0)
BURST_TIMEOUT = 120.0


@pytest.fixture(scope="module")
def srv(tmp_path_factory):
    cfg = config(parallel=PARALLEL, context=256, max_queue=MAX_QUEUE)
    with live_server(tmp_path_factory.mktemp("load"), cfg) as s:
        yield s


async def _one(client: httpx.AsyncClient, srv, i: int, start: asyncio.Event) -> dict:
    body = {"model": srv.model, "prompt": f"Request number {i} says", "max_tokens": 8, "stream": True,
            "temperature": 0}
    await start.wait()
    t0 = time.monotonic()
    async with client.stream("POST", f"{srv.api}/completions", json=body, headers=srv.headers) as r:
        raw = await r.aread() if r.status_code != 200 else None
        lines = [line async for line in r.aiter_lines()] if r.status_code == 200 else []
        return {"status": r.status_code, "headers": dict(r.headers), "raw": raw, "lines": lines,
                "seconds": time.monotonic() - t0}


async def _burst(srv) -> list[dict]:
    limits = httpx.Limits(max_connections=BURST, max_keepalive_connections=0)
    async with httpx.AsyncClient(timeout=CLIENT_TIMEOUT, limits=limits) as client:
        start = asyncio.Event()
        tasks = [asyncio.create_task(_one(client, srv, i, start)) for i in range(BURST)]
        await asyncio.sleep(0.05)
        start.set()                       # all at once
        return await asyncio.wait_for(asyncio.gather(*tasks), BURST_TIMEOUT)


def test_burst_gets_only_200_and_503_and_every_admitted_stream_completes(srv):
    results = asyncio.run(_burst(srv))
    statuses = sorted(r["status"] for r in results)
    print("burst statuses", {s: statuses.count(s) for s in set(statuses)})
    assert set(statuses) <= {200, 503}, statuses
    ok = [r for r in results if r["status"] == 200]
    refused = [r for r in results if r["status"] == 503]
    # The first BOUND to arrive always fit; a burst of 4x the bound cannot all fit.
    assert len(ok) >= BOUND, statuses
    assert refused, f"no 503 in a burst of {BURST} against a bound of {BOUND}: {statuses}"
    for r in refused:
        retry = r["headers"].get("retry-after", "")
        assert retry.isdigit() and int(retry) >= 1, r["headers"]
        err = assert_openai_error(json.loads(r["raw"]), "server_overloaded")
        assert str(PARALLEL) in err["message"] and str(MAX_QUEUE) in err["message"], err
    for r in ok:
        events = sse_events(iter(r["lines"]))
        assert check_stream_end(events) == "finished", events[-3:]
        chunks = [e for e in events if isinstance(e, dict)]
        assert chunks[-1]["choices"][0]["finish_reason"] in ("length", "stop"), chunks[-1]
        assert all(c["object"] == "text_completion" for c in chunks)

    ep = srv.wait_idle(timeout=10)
    assert ep["state"] == "ready", ep
    assert ep["in_flight"] == 0 and ep["slots_used"] == 0, ep
    assert ep["queue_depth"] == 0 and ep["running"] == 0, ep


def test_endpoint_serves_normally_after_the_burst(srv):
    asyncio.run(_burst(srv))
    srv.wait_idle(timeout=10)
    r = httpx.post(f"{srv.api}/completions", headers=srv.headers, timeout=CLIENT_TIMEOUT,
                   json={"model": srv.model, "prompt": "After the storm", "max_tokens": 4})
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["choices"][0]["finish_reason"] in ("length", "stop")
    assert body["usage"]["completion_tokens"] >= 1
    ep = srv.wait_idle(timeout=10)
    assert ep["in_flight"] == 0 and ep["slots_used"] == 0, ep
