"""Batch priority on a remote endpoint (issue 23): batch-priority requests hold at most
`batch_share` of the endpoint's capacity (replicas x parallel) at the upstream, the rest wait
(bounded by their deadline) while interactive requests pass. ProxyEngine in process against the
scripted upstream over real HTTP (testkit.upstream); the upstream counts what it holds at once."""

from __future__ import annotations

import asyncio
import threading
import time

import pytest

from modelyard.engine.types import ChoiceDelta, EngineRequest, Usage
from modelyard.errors import ConfigError, DeadlineExceeded
from modelyard.proxy.batch_share import batch_limit
from modelyard.proxy.engine import ProxyEngine
from modelyard.settings import EndpointSpec
from testkit.until import until
from testkit.upstream import sse, upstream


class Held:
    """The upstream's side: answers are held until `gate` opens; counts what it holds per kind."""

    def __init__(self) -> None:
        self.gate = threading.Event()
        self.lock = threading.Lock()
        self.now = {"batch": 0, "interactive": 0}
        self.peak = {"batch": 0, "interactive": 0}

    def answer(self, script: str, body: dict, request):
        kind = script.split(":")[0]

        async def parts():
            with self.lock:
                self.now[kind] += 1
                self.peak[kind] = max(self.peak[kind], self.now[kind])
            try:
                for _ in range(3000):             # bounded: 30 s
                    if self.gate.is_set():
                        break
                    await asyncio.sleep(0.01)
                yield {"id": "up", "object": "text_completion",
                       "choices": [{"index": 0, "text": script, "logprobs": None, "finish_reason": "stop"}]}
                yield {"id": "up", "choices": [], "usage": {"prompt_tokens": 1, "completion_tokens": 1,
                                                            "total_tokens": 2}}
                yield "data: [DONE]\n\n"
            finally:
                with self.lock:
                    self.now[kind] -= 1
        return sse(parts())

    def held(self) -> dict[str, int]:
        with self.lock:
            return dict(self.now)


async def _text(engine: ProxyEngine, r: EngineRequest) -> str:
    text = ""
    async for out in engine.generate(r):
        if isinstance(out, ChoiceDelta):
            text += out.text
        else:
            assert isinstance(out, Usage)
    return text


def _request(rid: str, priority: str, deadline: float | None = None) -> EngineRequest:
    return EngineRequest(rid, f"{priority}:{rid}", max_tokens=4, priority=priority, deadline=deadline)


def test_batch_requests_hold_at_most_their_share_while_interactive_ones_pass():
    held = Held()
    with upstream(held.answer) as (url, seen):
        # capacity 2 replicas (the same server twice) x parallel 2 = 4; half of it: 2 batch at once
        engine = ProxyEngine(EndpointSpec(name="remote", engine="openai", urls=(url, url), parallel=2,
                                          batch_share=0.5), health_interval=3600.0)
        assert engine.batch_share.limit == 2

        async def main() -> None:
            await engine.start()
            try:
                batch = [asyncio.ensure_future(_text(engine, _request(f"b{k}", "batch"))) for k in range(6)]
                inter = [asyncio.ensure_future(_text(engine, _request(f"i{k}", "interactive"))) for k in range(5)]
                # all five interactive requests reach the upstream (over the share, over the
                # capacity even) while two batch requests do and four wait
                await asyncio.to_thread(until, lambda: held.held() == {"batch": 2, "interactive": 5}, 30,
                                        "2 batch and 5 interactive requests at the upstream")
                status = engine.status()
                assert (status["batch_in_flight"], status["batch_waiting"], status["batch_limit"]) == (2, 4, 2)
                held.gate.set()
                texts = await asyncio.wait_for(asyncio.gather(*batch, *inter), 60)
                assert texts == [f"batch:b{k}" for k in range(6)] + [f"interactive:i{k}" for k in range(5)]
                assert engine.status()["batch_in_flight"] == 0
            finally:
                await engine.stop()

        asyncio.run(main())
    assert held.peak["batch"] == 2            # never more than the share, though 6 were sent
    assert len(seen) == 11                    # every request was answered once, none refused


def test_a_waiting_batch_request_ends_at_its_deadline_not_before():
    held = Held()
    with upstream(held.answer) as (url, seen):
        engine = ProxyEngine(EndpointSpec(name="remote", engine="openai", urls=(url,), parallel=1),
                             health_interval=3600.0)

        async def main() -> None:
            await engine.start()
            try:
                first = asyncio.ensure_future(_text(engine, _request("b0", "batch")))
                await asyncio.to_thread(until, lambda: held.held()["batch"] == 1, 30, "the first batch request upstream")
                with pytest.raises(DeadlineExceeded, match="batch share .1 batch requests at once"):
                    await _text(engine, _request("b1", "batch", deadline=time.monotonic() + 0.3))
                assert engine.status()["batch_waiting"] == 0
                held.gate.set()
                assert await asyncio.wait_for(first, 30) == "batch:b0"
            finally:
                await engine.stop()

        asyncio.run(main())
    assert [b["prompt"] for b in seen] == ["batch:b0"]


@pytest.mark.parametrize("share", [0, -0.1, 1.5])
def test_batch_share_out_of_range_is_refused_naming_it(share):
    with pytest.raises(ConfigError, match=f"batch_share must be > 0 and <= 1, got {share}"):
        EndpointSpec(name="remote", engine="openai", urls=("http://x/v1",), batch_share=share)


def test_the_limit_is_never_zero():
    assert batch_limit(EndpointSpec(name="r", engine="openai", urls=("http://x/v1",), parallel=1, batch_share=0.1)) == 1
    assert batch_limit(EndpointSpec(name="r", engine="openai", urls=("http://x/v1",) * 3, parallel=4,
                                    batch_share=0.5)) == 6
