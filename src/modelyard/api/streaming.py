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

from ..engine.types import ChoiceDelta, EngineOutput, TokenLogprobs, Usage
from ..errors import ModelyardError

log = logging.getLogger("modelyard.api")
Event = tuple[int, EngineOutput]     # (prompt number, engine output)
_END = object()


async def prime(stream: AsyncIterator[EngineOutput]) -> AsyncIterator[EngineOutput]:
    """Pull the first event now, so errors (unknown token, context overflow, queue full,
    upstream 4xx) become a plain HTTP error before any response has started."""
    first = await stream.__anext__()

    async def chained() -> AsyncIterator[EngineOutput]:
        try:
            yield first
            async for event in stream:
                yield event
        finally:
            await stream.aclose()
    return chained()


async def prime_all(streams: list[AsyncIterator[EngineOutput]]) -> list[AsyncIterator[EngineOutput]]:
    results = await asyncio.gather(*(prime(s) for s in streams), return_exceptions=True)
    errors = [r for r in results if isinstance(r, BaseException)]
    if errors:
        for r, s in zip(results, streams):
            await (s.aclose() if isinstance(r, BaseException) else r.aclose())
        raise errors[0]
    return list(results)


async def merge(streams: list[AsyncIterator[EngineOutput]]) -> AsyncIterator[Event]:
    """Interleave the streams of several prompts as their events arrive."""
    if len(streams) == 1:
        try:
            async for event in streams[0]:
                yield 0, event
        finally:
            await streams[0].aclose()
        return
    queue: asyncio.Queue = asyncio.Queue()

    async def pump(i: int, stream: AsyncIterator[EngineOutput]) -> None:
        try:
            async for event in stream:
                await queue.put((i, event))
            await queue.put((i, _END))
        except Exception as exc:  # noqa: BLE001 - handed to the consumer
            await queue.put((i, exc))
        finally:
            await stream.aclose()

    tasks = [asyncio.create_task(pump(i, s)) for i, s in enumerate(streams)]
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
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


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
    if the route itself is cancelled (api/disconnect cancels it when the client leaves): a
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
