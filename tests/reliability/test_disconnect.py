"""A client that leaves is noticed at any stage: queued, prefilling (before its first token,
while the route still primes the stream) or decoding, streaming or not. Its request is aborted
and its slot freed, so the endpoint's counters return to 0 without anyone reading the answer.

Long token-id prompts (1,800 tokens, distinct per request so no prefix is shared) on one thread
and a 64-token step budget keep the requests prefilling for many seconds: the clients give up
long before any first token. Two slots, three requests: one of them waits in the queue.
"""

from __future__ import annotations

import threading

import httpx
import pytest

from helpers import MODEL, config, live_server

pytestmark = pytest.mark.model

PROMPT_TOKENS = 1800
NO_EOG = {"0": -100, "1": -100, "2": -100}          # no early end: decode runs to max_tokens
BUSY = ("in_flight", "slots_used", "queue_depth", "running")


@pytest.fixture(scope="module")
def srv(tmp_path_factory):
    with live_server(tmp_path_factory.mktemp("disconnect"),
                     config(parallel=2, context=2048, batch=64, max_queue=4)) as s:
        yield s


def _prompt(i: int) -> list[int]:
    return [500 + (i * 131 + j * 7) % 20000 for j in range(PROMPT_TOKENS)]


def _give_up(srv, i: int, stream: bool, max_tokens: int = 200) -> None:
    """Send one request and leave after 0.3 s without an answer (a read timeout closes the socket)."""
    body = {"model": MODEL, "prompt": _prompt(i), "max_tokens": max_tokens, "stream": stream,
            "logit_bias": NO_EOG}
    try:
        with httpx.Client(timeout=httpx.Timeout(0.3, connect=5.0)) as c:
            with c.stream("POST", f"{srv.api}/completions", json=body, headers=srv.headers) as r:
                for _ in r.iter_bytes():
                    pass
    except httpx.TimeoutException:
        return
    raise AssertionError(f"request {i} answered within 0.3 s: the test needs a longer prefill")


def _busy(ep: dict) -> dict:
    return {f: ep.get(f) for f in BUSY}


def test_clients_that_leave_before_their_first_token_are_aborted(srv):
    clients = [threading.Thread(target=_give_up, args=(srv, i, i != 1)) for i in range(3)]
    for t in clients:
        t.start()
    for t in clients:
        t.join(30)
    # The clients are gone; their prefills (seconds each, on one thread) must have been cut.
    ep = srv.wait_idle(timeout=5.0, fields=BUSY)
    assert _busy(ep) == {f: 0 for f in BUSY}, _busy(ep)
    # And the endpoint serves the next request.
    r = httpx.post(f"{srv.api}/completions", json={"model": MODEL, "prompt": "Hello", "max_tokens": 2},
                   headers=srv.headers, timeout=60)
    assert r.status_code == 200, r.text


def test_a_client_that_leaves_while_decoding_is_aborted(srv):
    """Short prompt: the first token comes soon, then the client leaves mid-stream."""
    body = {"model": MODEL, "prompt": "Once upon a time", "max_tokens": 1500, "stream": True,
            "logit_bias": NO_EOG}
    with httpx.Client(timeout=60) as c:
        with c.stream("POST", f"{srv.api}/completions", json=body, headers=srv.headers) as r:
            assert r.status_code == 200
            lines = r.iter_lines()
            assert next(l for l in lines if l.startswith("data:"))
            assert srv.endpoint()["running"] == 1
    ep = srv.wait_idle(timeout=5.0, fields=BUSY)
    assert _busy(ep) == {f: 0 for f in BUSY}, _busy(ep)


def test_a_non_streaming_client_that_leaves_while_decoding_is_aborted(srv):
    """Its answer is being collected (past priming) when it leaves: the collection is cancelled
    with the route, not left to decode 1,500 tokens for nobody."""
    body = {"model": MODEL, "prompt": "Once upon a time", "max_tokens": 1500, "logit_bias": NO_EOG}
    with pytest.raises(httpx.TimeoutException):      # 1,500 tokens on one thread take far longer than 2 s
        httpx.post(f"{srv.api}/completions", json=body, headers=srv.headers,
                   timeout=httpx.Timeout(2.0, connect=5.0))
    ep = srv.wait_idle(timeout=5.0, fields=BUSY)
    assert _busy(ep) == {f: 0 for f in BUSY}, _busy(ep)
