"""api/openai/streaming.merge with a reader that stops reading (issue 19, item 8), no server: what waits
for the reader is bounded as one prompt's stream is (MAX_PENDING steps of n choices, in events),
past that every prompt's stream is closed (its engine request aborted) without the reader doing
anything, and the reader's next event is the error. A reader that keeps up sees every event,
also while a prompt queued behind the others has given nothing (priming does not wait for it),
and a prompt's error that comes while priming is still raised by prime_all."""

from __future__ import annotations

import asyncio

import pytest

from modelyard.api.openai import streaming
from modelyard.engine.types import ChoiceDelta, Usage
from modelyard.errors import EngineError

PENDING = 8      # MAX_PENDING for these tests: a bound reached in milliseconds


class Endless:
    """A prompt's engine stream that never ends by itself: n deltas a step, counted; closed is
    what aborting its engine request looks like from here."""

    def __init__(self, n: int) -> None:
        self.n, self.produced, self.closed = n, 0, False

    async def run(self):
        try:
            while True:
                for i in range(self.n):
                    self.produced += 1
                    yield ChoiceDelta(i, "x", None, None)
                await asyncio.sleep(0)          # one engine step
        finally:
            self.closed = True


def bound(prompts: int, n: int) -> int:
    """What the merged stream may hold: MAX_PENDING steps of every choice, and each usage."""
    return prompts * (PENDING * n + 1)


@pytest.mark.parametrize("n", [1, 3])
def test_a_reader_that_stops_gets_the_error_and_every_stream_is_closed(monkeypatch, n):
    monkeypatch.setattr(streaming, "MAX_PENDING", PENDING, raising=False)
    prompts = [Endless(n) for _ in range(4)]

    async def main() -> None:
        streams = [p.run() for p in prompts]
        events = streaming.merge(streams, n) if n != 1 else streaming.merge(streams)     # n = 1: the default
        await events.__anext__()                # then the reader reads nothing for a while
        for _ in range(1000):                   # bounded: the bound is met within a few steps
            if all(p.closed for p in prompts):
                break
            await asyncio.sleep(0)
        assert all(p.closed for p in prompts), [p.produced for p in prompts]
        # What was made before the streams were closed: the bound, plus at most a step of each.
        assert sum(p.produced for p in prompts) <= bound(4, n) + 1 + len(prompts) * n
        with pytest.raises(EngineError, match=f"reads too slowly: {bound(4, n)} events"):
            await events.__anext__()
        await events.aclose()

    asyncio.run(main())


def test_a_backlog_past_the_bound_closes_even_the_streams_not_read_yet(monkeypatch):
    """The first prompt's pump finds more waiting than the bound before the others have run
    once: those are closed too (their engine requests aborted), not left to the garbage collector."""
    monkeypatch.setattr(streaming, "MAX_PENDING", PENDING, raising=False)
    closed: list[int] = []

    async def backlog(k: int):
        try:
            for _ in range(10 * PENDING):       # there already: read without a pause
                yield ChoiceDelta(0, "x", None, None)
            await asyncio.Event().wait()        # then nothing more, ever
        finally:
            closed.append(k)

    async def main() -> None:
        events = streaming.merge(await streaming.prime_all([backlog(k) for k in range(4)]))
        with pytest.raises(EngineError, match="reads too slowly"):
            await events.__anext__()
        for _ in range(100):
            if len(closed) == 4:
                break
            await asyncio.sleep(0)
        assert sorted(closed) == [0, 1, 2, 3]
        await events.aclose()

    asyncio.run(main())


def test_a_reader_that_keeps_up_sees_every_event_of_every_prompt(monkeypatch):
    monkeypatch.setattr(streaming, "MAX_PENDING", PENDING, raising=False)

    async def finite(k: int, steps: int):
        for s in range(steps):
            yield ChoiceDelta(0, f"{k}:{s}", None, None)
            await asyncio.sleep(0)
        yield Usage(1, steps)

    async def main() -> list:
        return [event async for event in streaming.merge([finite(k, 50) for k in range(5)])]

    events = asyncio.run(main())
    texts = sorted(e.text for _, e in events if isinstance(e, ChoiceDelta))
    assert texts == sorted(f"{k}:{s}" for k in range(5) for s in range(50))      # 250 > the bound (85): never cut
    assert sum(isinstance(e, Usage) for _, e in events) == 5


def test_priming_does_not_wait_for_a_prompt_queued_behind_the_others(monkeypatch):
    """Fewer slots than prompts: the last prompt gives nothing until the first has ended. Priming
    ends once the first prompt's output is under way, and the reader reads it meanwhile (it
    used to wait for the last prompt's first token, while the first prompt's output piled up)."""
    monkeypatch.setattr(streaming, "MAX_PENDING", PENDING, raising=False)
    first_done = asyncio.Event()

    async def running():
        for s in range(10 * PENDING):           # far past the bound, read as it comes
            yield ChoiceDelta(0, f"{s}", None, None)
            await asyncio.sleep(0)
        yield Usage(1, 10 * PENDING)
        first_done.set()

    async def queued():
        await first_done.wait()                 # starts when the first prompt's slot is free
        yield ChoiceDelta(0, "late", None, None)
        yield Usage(1, 1)

    async def main() -> list:
        events = streaming.merge(await asyncio.wait_for(streaming.prime_all([running(), queued()]), 5))
        return [event async for event in events]

    events = asyncio.run(main())
    assert [e.text for i, e in events if i == 0 and isinstance(e, ChoiceDelta)] == [str(s) for s in range(10 * PENDING)]
    assert [e.text for i, e in events if i == 1 and isinstance(e, ChoiceDelta)] == ["late"]


def test_a_prompts_error_while_another_gives_its_first_token_comes_from_priming():
    """Errors before headers: a prompt refused while the others have given one token each is
    raised by prime_all, and every stream is closed."""
    closed: list[str] = []

    async def one_token():
        try:
            yield ChoiceDelta(0, "x", None, None)
            await asyncio.Event().wait()
        finally:
            closed.append("ok")

    async def refused():
        try:
            await asyncio.sleep(0.01)
            raise EngineError("prompt 1 is refused")
            yield                                       # an async generator
        finally:
            closed.append("refused")

    async def main() -> None:
        with pytest.raises(EngineError, match="prompt 1 is refused"):
            await streaming.prime_all([one_token(), refused()])

    asyncio.run(main())
    assert sorted(closed) == ["ok", "refused"]
