"""Graceful shutdown of `modelyard serve` on SIGTERM: /ready turns 503 at once, new work is refused
(400, the endpoint is draining) while the process keeps answering, requests in flight get the
grace period to finish and then end with an error event, never a silent cut; the process exits
0. A second SIGTERM during the drain exits at once."""

from __future__ import annotations

import signal
import threading
import time

import httpx
import pytest

from helpers import KEY, MODEL, assert_openai_error, check_stream_end, config, live_server, sse_events
from testkit.servers import modelyard_process
from testkit.until import until

pytestmark = pytest.mark.model

TIMEOUT = httpx.Timeout(60.0, connect=10.0)
NO_EOG = {"0": -100, "2": -100, "4": -100}   # this model's end-of-generation tokens: run to max_tokens


class Stream(threading.Thread):
    """One streaming completion read on its own thread; keeps every line it got."""

    def __init__(self, srv, i: int, max_tokens: int) -> None:
        super().__init__(daemon=True, name=f"stream-{i}")
        self.url = f"{srv.api}/completions"
        self.headers = srv.headers
        self.body = {"model": srv.model, "prompt": f"Story {i}: once upon a time", "max_tokens": max_tokens,
                     "stream": True, "temperature": 0, "logit_bias": NO_EOG}
        self.first = threading.Event()
        self.status: int | None = None
        self.lines: list[str] = []
        self.error: BaseException | None = None

    def run(self) -> None:
        try:
            with httpx.stream("POST", self.url, json=self.body, headers=self.headers, timeout=TIMEOUT) as r:
                self.status = r.status_code
                for line in r.iter_lines():
                    self.lines.append(line)
                    if line.startswith("data:"):
                        self.first.set()
        except BaseException as exc:  # noqa: BLE001 - a cut stream is a finding, reported by the test
            self.error = exc
        finally:
            self.first.set()

    @property
    def events(self) -> list[object]:
        return sse_events(iter(self.lines))

    def outcome(self) -> str:
        """"finished" or "error" (an error event, then [DONE]); fails on a silent cut."""
        assert self.error is None, f"{self.name}: {self.error!r} after {self.lines[-3:]}"
        assert self.status == 200, (self.name, self.status, self.lines[:3])
        return check_stream_end(self.events)


def _start_streams(srv, count: int, max_tokens: int, running: int) -> list[Stream]:
    """Start `count` streams; return once all are in flight and `running` have had a chunk."""
    streams = [Stream(srv, i, max_tokens) for i in range(count)]
    for s in streams:
        s.start()
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        started = sum(1 for s in streams if s.lines)
        if started >= running and srv.endpoint()["in_flight"] == count:
            break
        time.sleep(0.02)
    else:
        pytest.fail(f"streams did not start: {srv.endpoint()}\n{srv.log_tail()}")
    for s in streams:
        assert s.error is None, s.error
    return streams


def _join(streams: list[Stream], timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    for s in streams:
        s.join(max(0.1, deadline - time.monotonic()))
    alive = [s.name for s in streams if s.is_alive()]
    assert not alive, f"streams still open after {timeout}s: {alive}"


def test_sigterm_drains_in_flight_streams_then_exits_0(tmp_path):
    cfg = config(parallel=4, context=256, max_queue=8, server="grace_period = 20\n")
    with live_server(tmp_path / "srv", cfg) as srv:
        streams = _start_streams(srv, 8, max_tokens=48, running=4)
        srv.signal(signal.SIGTERM)

        r = httpx.get(f"{srv.base}/ready", timeout=5)
        assert r.status_code == 503, r.text
        assert r.json()["status"] == "shutting down"
        assert httpx.get(f"{srv.base}/health", timeout=5).status_code == 200   # still answering

        r = httpx.post(f"{srv.api}/completions", headers=srv.headers, timeout=10,
                       json={"model": srv.model, "prompt": "late", "max_tokens": 2})
        assert r.status_code == 400, r.text
        err = assert_openai_error(r.json(), "model_not_ready")
        assert err["param"] == "model" and "draining" in err["message"], err
        assert any(s.is_alive() for s in streams), "the drain ended before the checks: not a test"

        _join(streams)
        outcomes = [s.outcome() for s in streams]
        assert outcomes == ["finished"] * 8, outcomes      # 20 s of grace is plenty for 48 tokens
        for s in streams:
            chunks = [e for e in s.events if isinstance(e, dict)]
            assert chunks[-1]["choices"][0]["finish_reason"] == "length", chunks[-1]
            assert "".join(c["choices"][0]["text"] for c in chunks)

        assert srv.proc.wait(timeout=30) == 0, srv.log_tail()
        # the drain ended because the streams did, not because the 20 s grace period ran out (a
        # state in the log, where a wall-clock bound would depend on the machine's load)
        assert "draining" in srv.log_text() and "grace period over" not in srv.log_text()


def test_grace_period_over_ends_streams_with_an_error_event(tmp_path):
    cfg = config(parallel=4, context=512, max_queue=4, server="grace_period = 1\n")
    with live_server(tmp_path / "srv", cfg) as srv:
        streams = _start_streams(srv, 4, max_tokens=400, running=4)
        srv.signal(signal.SIGTERM)
        t0 = time.monotonic()
        _join(streams, timeout=30)
        for s in streams:
            assert s.outcome() == "error", s.lines[-3:]
            err = s.events[-2]["error"]
            assert "shutting down" in err["message"], err
            chunks = [e for e in s.events[:-2] if isinstance(e, dict)]
            assert chunks and not any(c["choices"][0]["finish_reason"] for c in chunks)
        assert srv.proc.wait(timeout=30) == 0, srv.log_tail()
        # it waited the grace period (a lower bound: load only makes it later); that the grace
        # period, not the streams' end, stopped it is the error events above and the log line
        assert time.monotonic() - t0 >= 0.9
        assert "grace period over" in srv.log_text()


def test_second_sigterm_during_the_drain_exits_at_once(tmp_path):
    cfg = config(parallel=4, context=512, max_queue=8, server="grace_period = 20\n")
    with live_server(tmp_path / "srv", cfg) as srv:
        streams = _start_streams(srv, 8, max_tokens=400, running=4)
        srv.signal(signal.SIGTERM)
        r = httpx.get(f"{srv.base}/ready", timeout=5)
        assert r.status_code == 503, r.text                # draining now
        time.sleep(0.3)
        assert srv.proc.poll() is None
        srv.signal(signal.SIGTERM)
        code = srv.proc.wait(timeout=15)
        _join(streams, timeout=30)
        # 8 x 400 tokens at 4 at a time is far from done: it did not wait for the drain (the
        # streams' state says so, where "exited within 5 s" depended on the machine's load)
        unfinished = [s.name for s in streams if s.error is not None or not s.lines
                      or s.lines[-1] != "data: [DONE]" or "finish_reason\":\"length" not in "".join(s.lines)]
        assert unfinished, "every stream finished: the second signal was not tested"
        assert code == 0, srv.log_tail()
        assert "second signal" in srv.log_text()


def test_sigterm_while_the_model_loads_exits_0_cleanly(tmp_path):
    """SIGTERM once the endpoint has its file and is loading it on the engine thread (gemma3-270m,
    with room for 16 sequences of 2,048 tokens, is the slowest to load): the load finishes, the
    engine thread closes what it made and ends, and the process exits 0 with no traceback.
    (tests/local/test_engine_lifecycle.py proves the same of LocalEngine in process.)"""
    cfg = config(api_keys=(KEY,)).replace(
        f'name = "{MODEL}"\nmodel = "{MODEL}"\ncontext = 256\nparallel = 2\n',
        'name = "gemma3-270m"\nmodel = "gemma3-270m"\ncontext = 2048\nparallel = 16\n')
    assert "gemma3-270m" in cfg
    srv = modelyard_process(tmp_path, cfg, key=KEY, model="gemma3-270m").start()
    try:
        def loading() -> bool:      # the file is resolved: from then on the engine thread is loading it
            assert not srv.exited(), srv.log_tail()
            ep = srv.endpoint()
            if ep.get("state") == "ready":
                pytest.fail("the model loaded before the test could stop it: not a test")
            return ep.get("state") == "loading" and bool(ep.get("model_path"))
        until(loading, 120, "the endpoint loading its file", interval=0.01, retry_on=(httpx.TransportError,))
        srv.signal(signal.SIGTERM)
        code = srv.proc.wait(timeout=60)
    finally:
        srv.stop(timeout=5)
    log = srv.log_text()
    assert code == 0, log
    assert "Traceback" not in log and "InvalidStateError" not in log, log
    # The shutdown waited for the engine thread to finish the load and close it (not a daemon
    # thread killed mid-load, or dead of an exception with the context never freed).
    assert "gemma3-270m: stopped while loading; the engine thread closed the model and ended" in log, log
