"""Engine event streams -> one merged stream -> SSE lines or one JSON body.

Streaming and non-streaming consume the same merged event stream, so they cannot disagree.
Closing the merged stream (client gone) closes every engine stream, which aborts them.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from dataclasses import dataclass, field
from typing import AsyncIterator, Callable

from fastapi import Request

from ...engine.types import MAX_PENDING, ChoiceDelta, EngineOutput, TokenLogprobs, Usage, reads_too_slowly
from ...errors import ModelyardError

log = logging.getLogger("modelyard.api")
Event = tuple[int, EngineOutput]     # (prompt number, engine output)
_END = object()


class Primed:
    """An engine stream whose first event was pulled already (`prime`). Closing it closes the
    engine stream, read or not: a generator wrapper that was never started would close only
    itself, leaving the engine request running (its slots held) until garbage collection."""

    def __init__(self, first: EngineOutput, stream: AsyncIterator[EngineOutput]) -> None:
        self._first: list[EngineOutput] = [first]
        self._stream = stream

    def __aiter__(self) -> "Primed":
        return self

    async def __anext__(self) -> EngineOutput:
        if self._first:
            return self._first.pop()
        return await self._stream.__anext__()

    async def aclose(self) -> None:
        self._first.clear()
        await self._stream.aclose()


async def prime(stream: AsyncIterator[EngineOutput]) -> Primed:
    """Pull the first event now, so errors (unknown token, context overflow, queue full,
    upstream 4xx) become a plain HTTP error before any response has started."""
    return Primed(await stream.__anext__(), stream)


async def prime_all(streams: list[AsyncIterator[EngineOutput]]) -> list[Primed]:
    results = await asyncio.gather(*(prime(s) for s in streams), return_exceptions=True)
    errors = [r for r in results if isinstance(r, BaseException)]
    if errors:
        for s in streams:
            await s.aclose()
        raise errors[0]
    return list(results)


async def merge(streams: list[Primed], n: int = 1) -> AsyncIterator[Event]:
    """Interleave the streams of several prompts (of `n` choices each) as their events arrive.

    One prompt's stream is read as its consumer reads, and its engine bounds what waits for the
    reader (engine.types.MAX_PENDING steps). Several are read by pumps as their events come, so
    that no prompt waits for another; that emptied the engines' queues into one here that grew
    with every step of every prompt for a client that reads slowly. It holds what the engines'
    queues would have held, no more: MAX_PENDING steps of every choice of the request (and each
    prompt's usage), in events. Past that every stream is closed (each request aborted, its
    slots freed, whether or not the client ever reads again) and the reader's next event is the
    error. (A step of every prompt at once is far below it: a reader that keeps up is never cut,
    nor one whose prompts' output waited for the last prompt to start, in prime_all.)"""
    if len(streams) == 1:
        try:
            async for event in streams[0]:
                yield 0, event
        finally:
            await streams[0].aclose()
        return
    bound = len(streams) * (MAX_PENDING * n + 1)
    queue: asyncio.Queue = asyncio.Queue()
    tasks: list[asyncio.Task] = []
    closing: list[asyncio.Task] = []

    async def close() -> None:
        """Every pump ended, then every stream closed (a pump cancelled before it ran never
        closes its own; closing twice is nothing)."""
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        for stream in streams:
            await stream.aclose()

    def overflow() -> None:
        while not queue.empty():
            queue.get_nowait()
        queue.put_nowait((0, reads_too_slowly(
            f"{bound} events of output ({MAX_PENDING} steps of {n} choices for each of {len(streams)} prompts)")))
        closing.append(asyncio.ensure_future(close()))

    async def pump(i: int, stream: Primed) -> None:
        # No finally: the stream has ended, failed (its request is over either way), or is
        # closed by close().
        try:
            async for event in stream:
                if queue.qsize() >= bound:
                    overflow()
                    return
                queue.put_nowait((i, event))
            queue.put_nowait((i, _END))
        except Exception as exc:  # noqa: BLE001 - handed to the consumer
            queue.put_nowait((i, exc))

    tasks += [asyncio.create_task(pump(i, s)) for i, s in enumerate(streams)]
    try:
        left = len(tasks)
        while left:
            i, event = await queue.get()
            if event is _END:
                left -= 1
            elif isinstance(event, Exception):
                raise event
            else:
                yield i, event
    finally:
        await (closing[0] if closing else close())


@dataclass
class Completion:
    """Builds response bodies (whole or chunks) from events; one per HTTP request."""

    id: str
    created: int
    model: str
    n: int
    prompt_tokens: int = 0
    completion_tokens: int = 0
    texts: dict[int, list[str]] = field(default_factory=dict)
    logprobs: dict[int, TokenLogprobs] = field(default_factory=dict)
    finish: dict[int, str | None] = field(default_factory=dict)
    started: set[int] = field(default_factory=set)     # choices that have sent a chunk
    on_done: Callable[["Completion"], None] | None = None  # metrics and the request log
    t0: float = field(default_factory=time.monotonic)
    first_token: float | None = None

    def saw(self, d: ChoiceDelta) -> None:
        if self.first_token is None and d.text:
            self.first_token = time.monotonic()

    def done(self) -> None:
        if self.on_done is not None:
            self.on_done(self)

    def index(self, prompt: int, delta: ChoiceDelta) -> int:
        return prompt * self.n + delta.index

    def add_usage(self, usage: Usage) -> None:
        self.prompt_tokens += usage.prompt_tokens
        self.completion_tokens += usage.completion_tokens

    @property
    def usage(self) -> dict:
        return {"prompt_tokens": self.prompt_tokens, "completion_tokens": self.completion_tokens,
                "total_tokens": self.prompt_tokens + self.completion_tokens}

    def envelope(self, choices: list[dict]) -> dict:
        return {"id": self.id, "object": "text_completion", "created": self.created,
                "model": self.model, "choices": choices}

    def chunk(self, prompt: int, d: ChoiceDelta) -> dict:
        return self.envelope([{"text": d.text, "index": self.index(prompt, d),
                               "logprobs": d.logprobs.as_dict() if d.logprobs else None,
                               "finish_reason": d.finish_reason.value if d.finish_reason else None}])

    def collect(self, prompt: int, d: ChoiceDelta) -> None:
        i = self.index(prompt, d)
        self.texts.setdefault(i, []).append(d.text)
        if d.logprobs is not None:
            self.logprobs.setdefault(i, TokenLogprobs()).extend(d.logprobs)
        if d.finish_reason is not None:
            self.finish[i] = d.finish_reason.value

    def body(self) -> dict:
        choices = [{"text": "".join(self.texts.get(i, [])), "index": i,
                    "logprobs": self.logprobs[i].as_dict() if i in self.logprobs else None,
                    "finish_reason": self.finish.get(i)} for i in sorted(self.texts)]
        return {**self.envelope(choices), "usage": self.usage}


def sse(data: dict | str) -> str:
    return f"data: {data if isinstance(data, str) else json.dumps(data, separators=(',', ':'))}\n\n"


async def to_sse(events: AsyncIterator[Event], out: Completion, include_usage: bool) -> AsyncIterator[str]:
    try:
        async for prompt, event in events:
            if isinstance(event, ChoiceDelta):
                out.saw(event)
                chunk = out.chunk(prompt, event)
                if chunk is None:          # held back (a tool call is sent once complete)
                    continue
                if include_usage:
                    chunk["usage"] = None
                yield sse(chunk)
            else:
                out.add_usage(event)
        if include_usage:
            yield sse({**out.envelope([]), "usage": out.usage})
        out.done()
    except ModelyardError as exc:
        yield sse(exc.body())          # an error event, never a silent cut
    except Exception as exc:  # noqa: BLE001
        log.exception("stream %s failed", out.id)
        yield sse({"error": {"message": f"internal error: {type(exc).__name__}", "type": "server_error",
                             "param": None, "code": None}})
    finally:
        await events.aclose()
    yield sse("[DONE]")


async def collect(events: AsyncIterator[Event], out: Completion) -> dict:
    async for prompt, event in events:
        if isinstance(event, ChoiceDelta):
            out.saw(event)
            out.collect(prompt, event)
        else:
            out.add_usage(event)
    out.done()
    return out.body()


async def unless_disconnected(request: Request, work: asyncio.Future | asyncio.Task, poll: float = 0.25):
    """Await `work`, cancelling it if the client goes away first (non-streaming requests), or
    if the route itself is cancelled (api/middleware/disconnect cancels it when the client leaves): a
    task awaited through asyncio.wait outlives its awaiter unless cancelled here."""
    try:
        while True:
            done, _ = await asyncio.wait({work}, timeout=poll)
            if done:
                return work.result()
            if await request.is_disconnected():
                work.cancel()
                await asyncio.gather(work, return_exceptions=True)
                return None
    except asyncio.CancelledError:
        work.cancel()
        await asyncio.gather(work, return_exceptions=True)
        raise
