"""Fault isolation: a failure while decoding one request's batch fails that request (500 with the
OpenAI error body, or an error event then [DONE] once its stream has started) and nothing else:
the endpoint stays ready, its slots come back, and the next request is served.

The app runs in process (create_app with a real LocalEngine on the default model, under uvicorn
in a thread on a loopback port: testkit.upstream.running), so the fault can be injected into
`LlamaCppRunner.execute`: it raises EngineError("injected") for a batch that holds the marked
request, identified by its token-id prompt.
"""

from __future__ import annotations

import threading

import httpx
import pytest

from helpers import KEY, MODEL, assert_openai_error, check_stream_end, sse_events
from testkit.servers import ServerAPI
from testkit.until import until
from testkit.upstream import running

from modelyard.api.app import create_app
from modelyard.errors import EngineError
from modelyard.local.runner import LlamaCppRunner
from modelyard.settings import EndpointSpec, Settings

pytestmark = pytest.mark.model

MARKER = [6403, 1980, 253, 655, 28120, 6403, 1980]      # a token-id prompt no other request sends
NO_EOG = {"0": -100, "2": -100, "4": -100}              # run to max_tokens
TIMEOUT = httpx.Timeout(60.0, connect=10.0)


class InProcessServer(ServerAPI):
    key, model = KEY, MODEL

    def __init__(self, base: str) -> None:
        self.base = base


@pytest.fixture(scope="module")
def srv():
    settings = Settings(api_keys=(KEY,), endpoints=(EndpointSpec(
        name=MODEL, model=MODEL, context=256, parallel=2, max_queue=4, batch=64, threads=1),))
    with running(create_app(settings), lifespan="on") as base:
        until(lambda: httpx.get(f"{base}/ready", timeout=5).status_code == 200, 60, "the endpoint ready")
        yield InProcessServer(base)


class Fault:
    """Makes LlamaCppRunner.execute raise for the marked request's batches: at its prefill, or at
    its decode once it has `after_tokens` output tokens. Fires `times` times (default: every
    time, like a request that really breaks the decode; a batch that fails is retried request
    by request, so a shared batch fires twice: once together, once for the marked one alone)."""

    def __init__(self, after_tokens: int | None = None, times: int = 10**6) -> None:
        self.after_tokens, self.left, self.fired = after_tokens, times, 0
        self.batch_sizes: list[int] = []      # requests in each failed batch
        self._original = LlamaCppRunner.execute
        fault = self

        def execute(runner, batch, prefilled=None):
            if fault.left and fault.hits(batch):
                fault.left -= 1
                fault.fired += 1
                fault.batch_sizes.append(len(batch.requests))
                raise EngineError("injected")
            return fault._original(runner, batch, prefilled)
        self.execute = execute

    def hits(self, batch) -> bool:
        if self.after_tokens is None:
            return any(c.request.prompt_ids == MARKER for c in batch.prefills)
        return any(r.prompt_ids == MARKER and len(seq.output_ids) >= self.after_tokens
                   for r, seq, _ in batch.decodes)


@pytest.fixture
def inject(monkeypatch):
    def make(**kw) -> Fault:
        fault = Fault(**kw)
        monkeypatch.setattr(LlamaCppRunner, "execute", fault.execute)
        return fault
    return make


def _complete(srv, prompt, **kw) -> httpx.Response:
    return httpx.post(f"{srv.api}/completions", headers=srv.headers, timeout=TIMEOUT,
                      json={"model": MODEL, "prompt": prompt, "temperature": 0, **kw})


def _assert_healthy_after(srv) -> None:
    ep = srv.wait_idle(timeout=10)
    assert ep["state"] == "ready" and ep["ready"] is True, ep
    assert ep["in_flight"] == 0 and ep["slots_used"] == 0, ep
    assert httpx.get(f"{srv.base}/ready", timeout=5).status_code == 200
    r = _complete(srv, "And then", max_tokens=3)
    assert r.status_code == 200, r.text
    assert r.json()["usage"]["completion_tokens"] >= 1
    assert srv.wait_idle()["slots_used"] == 0


class _Stream(threading.Thread):
    def __init__(self, srv, body: dict) -> None:
        super().__init__(daemon=True)
        self.srv, self.body = srv, body
        self.status: int | None = None
        self.lines: list[str] = []
        self.error: BaseException | None = None

    def run(self) -> None:
        try:
            with httpx.stream("POST", f"{self.srv.api}/completions", headers=self.srv.headers,
                              json={"model": MODEL, "stream": True, "temperature": 0, **self.body},
                              timeout=TIMEOUT) as r:
                self.status = r.status_code
                for line in r.iter_lines():
                    self.lines.append(line)
        except BaseException as exc:  # noqa: BLE001
            self.error = exc

    def wait_first_chunk(self, timeout: float = 30) -> None:
        def first_chunk() -> bool:
            if any(line.startswith("data:") for line in self.lines):
                return True
            assert self.is_alive(), (self.status, self.error, self.lines)
            return False
        until(first_chunk, timeout, "the first chunk", interval=0.01)


def test_fault_at_prefill_is_a_500_and_the_endpoint_recovers(srv, inject):
    fault = inject()
    r = _complete(srv, MARKER, max_tokens=4)
    assert fault.fired == 1
    assert r.status_code == 500, r.text
    err = assert_openai_error(r.json(), "server_error")
    assert "injected" in err["message"], err
    _assert_healthy_after(srv)


def test_fault_mid_stream_is_an_error_event_then_done(srv, inject):
    fault = inject(after_tokens=3)
    s = _Stream(srv, {"prompt": MARKER, "max_tokens": 20, "logit_bias": NO_EOG})
    s.start()
    s.join(60)
    assert not s.is_alive() and s.error is None, s.error
    assert fault.fired == 1
    assert s.status == 200
    events = sse_events(iter(s.lines))
    assert check_stream_end(events) == "error", events[-3:]
    err = events[-2]["error"]
    assert err["type"] == "server_error" and "injected" in err["message"], err
    texts = [e for e in events[:-2] if isinstance(e, dict)]
    assert texts, "the stream had started before the fault"
    _assert_healthy_after(srv)


def test_fault_in_one_request_spares_a_concurrent_one(srv, inject):
    """The other request is decoding when the marked one's prefill fails: it still completes."""
    fault = inject()
    other = _Stream(srv, {"prompt": "The weather today is", "max_tokens": 40, "logit_bias": NO_EOG})
    other.start()
    other.wait_first_chunk()
    r = _complete(srv, MARKER, max_tokens=4)
    other.join(60)
    assert fault.batch_sizes in ([2, 1], [1]), fault.batch_sizes   # together then alone, or alone
    assert r.status_code == 500, r.text
    assert "injected" in assert_openai_error(r.json(), "server_error")["message"]
    assert not other.is_alive() and other.error is None and other.status == 200
    events = sse_events(iter(other.lines))
    assert check_stream_end(events) == "finished", (fault.batch_sizes, events[-3:])
    chunks = [e for e in events if isinstance(e, dict)]
    assert chunks[-1]["choices"][0]["finish_reason"] == "length"
    _assert_healthy_after(srv)


def test_repeated_faults_never_break_the_endpoint(srv, inject):
    inject(times=5)
    for _ in range(5):
        r = _complete(srv, MARKER, max_tokens=2)
        assert r.status_code == 500, r.text
        assert_openai_error(r.json(), "server_error")
    _assert_healthy_after(srv)
