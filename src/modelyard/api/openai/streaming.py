"""Engine event streams -> one merged stream -> SSE lines or one JSON body.

Streaming and non-streaming consume the same merged event stream, so they cannot disagree.
Closing the merged stream (client gone) closes every engine stream, which aborts them.
"""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass, field
from typing import AsyncIterator, Awaitable, Callable

from ...engine.types import MAX_PENDING, ChoiceDelta, EngineOutput, TokenLogprobs, Usage, reads_too_slowly
from ...errors import ModelyardError
from .. import sse

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


async def prime_all(streams: list[AsyncIterator[EngineOutput]]) -> "list[Primed] | Merge":
    """Start reading the streams of a request's prompts, and return once a request error in any
    of them (unknown token, context overflow, queue full, upstream 4xx) would have come, so that
    it is a plain HTTP error before any response has started; `merge` then reads on.

    One prompt: its first event is pulled (`prime`). Several: their pumps start (`Merge`), and
    priming ends when every prompt has given its first event (or ended, or failed), or earlier,
    once one prompt's output is under way (a second token of one of its choices, or its end):
    its client must be able to read it. It used to wait for the first event of
    every prompt, but with fewer slots than prompts the last ones start only when the first
    ones end: the client got no byte meanwhile, and a first prompt past MAX_PENDING steps was
    aborted as if its client read too slowly. A request error comes before a prompt is queued
    (embedded engines check and tokenize first; an upstream answers its status first), so it
    still comes before the headers, unless a prompt that failed took longer to check than
    another took to generate two steps: its error then ends the stream, as a mid-stream
    failure does (and for a whole body, which is written only at the end, nothing changes)."""
    if len(streams) == 1:
        try:
            return [await prime(streams[0])]
        except BaseException:
            await streams[0].aclose()
            raise
    merged = Merge(streams)
    await merged.prime()
    return merged


def merge(streams: "list[AsyncIterator[EngineOutput]] | Merge", n: int = 1) -> AsyncIterator[Event]:
    """The events of a request's prompts (of `n` choices each), as they arrive: `prime_all`'s
    result, or streams not primed."""
    if isinstance(streams, Merge):
        streams.n = n           # before anything is read: the bound holds from the first event
        return streams.events()
    if len(streams) == 1:
        return _one(streams[0])
    return Merge(streams, n).events()


async def _one(stream: AsyncIterator[EngineOutput]) -> AsyncIterator[Event]:
    """One prompt's stream is read as its consumer reads, and its engine bounds what waits for
    the reader (engine.types.MAX_PENDING steps)."""
    try:
        async for event in stream:
            yield 0, event
    finally:
        await stream.aclose()


class Merge:
    """Interleaves the streams of several prompts (of `n` choices each) as their events arrive.

    Pumps read each stream as its events come, so that no prompt waits for another; that
    emptied the engines' queues into one here that grew with every step of every prompt for a
    client that reads slowly. It holds what the engines' queues would have held, no more:
    MAX_PENDING steps of every choice of the request (and each prompt's usage), in events.
    Past that every stream is closed (each request aborted, its slots freed, whether or not the
    client ever reads again) and the reader's next event is the error. A reader that keeps up
    is never cut: what waits for it is what came since it last read (a step of every prompt at
    once is far below the bound), and priming (`prime`) ends as soon as a prompt's output is
    under way, so the reader reads from then on, whatever the prompts still queued."""

    def __init__(self, streams: list[AsyncIterator[EngineOutput]], n: int = 1) -> None:
        self.streams = streams
        self.n = n
        self._queue: asyncio.Queue = asyncio.Queue()
        self._tasks: list[asyncio.Task] = []
        self._closing: list[asyncio.Task] = []
        self._heard = [0] * len(streams)     # items each pump has queued: events, its end or error
        self._under_way = False               # a prompt gave a choice's second token, or ended
        self._failed: Exception | None = None
        self._news = asyncio.Event()          # a pump queued something (for prime)

    @property
    def bound(self) -> int:
        return len(self.streams) * (MAX_PENDING * self.n + 1)

    def _start(self) -> None:
        if not self._tasks:
            self._tasks = [asyncio.create_task(self._pump(i, s)) for i, s in enumerate(self.streams)]

    async def prime(self) -> None:
        """Until every stream has said something, or one's output is under way (prime_all says
        why); a stream's error raised here, every stream closed."""
        self._start()
        try:
            while not (self._failed or self._closing or self._under_way or all(self._heard)):
                self._news.clear()
                await self._news.wait()
        except BaseException:       # the route was cancelled (its client left) while priming
            await self._close()
            raise
        if self._failed is not None:
            await self._close()
            raise self._failed

    async def events(self) -> AsyncIterator[Event]:
        self._start()
        try:
            left = len(self._tasks)
            while left:
                i, event = await self._queue.get()
                if event is _END:
                    left -= 1
                elif isinstance(event, Exception):
                    raise event
                else:
                    yield i, event
        finally:
            await (self._closing[0] if self._closing else self._close())

    def _put(self, i: int, item: object) -> None:
        self._queue.put_nowait((i, item))
        self._heard[i] += 1
        self._news.set()

    async def _close(self) -> None:
        """Every pump ended, then every stream closed (a pump cancelled before it ran never
        closes its own; closing twice is nothing)."""
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        for stream in self.streams:
            await stream.aclose()

    def _overflow(self) -> None:
        while not self._queue.empty():
            self._queue.get_nowait()
        self._queue.put_nowait((0, reads_too_slowly(
            f"{self.bound} events of output ({MAX_PENDING} steps of {self.n} choices for each of "
            f"{len(self.streams)} prompts)")))
        self._closing.append(asyncio.ensure_future(self._close()))
        self._news.set()

    async def _pump(self, i: int, stream: AsyncIterator[EngineOutput]) -> None:
        # No finally: the stream has ended, failed (its request is over either way), or is
        # closed by _close().
        choices: set[int] = set()     # those that gave a token: their next one is a later step's
        try:
            async for event in stream:
                if self._queue.qsize() >= self.bound:
                    self._overflow()
                    return
                if isinstance(event, ChoiceDelta):
                    self._under_way = self._under_way or event.index in choices
                    choices.add(event.index)
                self._put(i, event)
            self._under_way = True
            self._put(i, _END)
        except Exception as exc:  # noqa: BLE001 - handed to the consumer (or to prime)
            if self._failed is None:
                self._failed = exc
            self._put(i, exc)


@dataclass
class Completion:
    """Builds response bodies (whole or chunks) from events; one per HTTP request."""

    id: str
    created: int
    model: str
    n: int
    prompt_tokens: int = 0
    completion_tokens: int = 0
    cached_tokens: int = 0
    cached_visible: bool = True       # api/openai/cache_scope.cached_tokens_visible
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
        self.cached_tokens += usage.cached_tokens

    @property
    def usage(self) -> dict:
        # cached_tokens: the prompt tokens its prefix cache held (its own key's partition only,
        # api/openai/cache_scope: a tenant learns nothing of another's prompts from it)
        usage = {"prompt_tokens": self.prompt_tokens, "completion_tokens": self.completion_tokens,
                 "total_tokens": self.prompt_tokens + self.completion_tokens}
        if self.cached_visible:
            usage["prompt_tokens_details"] = {"cached_tokens": self.cached_tokens}
        return usage

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

    # -- SSE framing (OpenAI's: data-only chunks, then [DONE]); api/anthropic frames its own --

    def sse_start(self) -> list[str]:
        return []

    def sse_delta(self, prompt: int, d: ChoiceDelta, include_usage: bool) -> list[str]:
        chunk = self.chunk(prompt, d)
        if chunk is None:          # held back (a tool call is sent once complete)
            return []
        if include_usage:
            chunk["usage"] = None
        return [sse.data(chunk)]

    def sse_end(self, include_usage: bool) -> list[str]:
        return [sse.data({**self.envelope([]), "usage": self.usage})] if include_usage else []

    def sse_error(self, status: int, body: dict) -> str:
        return sse.data(body)

    def sse_close(self) -> list[str]:
        return [sse.data("[DONE]")]

    def body(self) -> dict:
        choices = [{"text": "".join(self.texts.get(i, [])), "index": i,
                    "logprobs": self.logprobs[i].as_dict() if i in self.logprobs else None,
                    "finish_reason": self.finish.get(i)} for i in sorted(self.texts)]
        return {**self.envelope(choices), "usage": self.usage}


Settle = Callable[[Completion], Awaitable[None]]


async def to_sse(events: AsyncIterator[Event], out: Completion, include_usage: bool,
                 settle: Settle | None = None) -> AsyncIterator[str]:
    """The stream's SSE lines, framed by `out` (OpenAI's data-only chunks and `[DONE]`, or, for
    Anthropic's API, its named events): whatever ends it, an error event rather than a cut.
    `settle` runs once the generation has ended, before its last events (the Responses API
    stores the response there, so that one whose end a client saw is kept)."""
    try:
        for line in out.sse_start():
            yield line
        async for prompt, event in events:
            if isinstance(event, ChoiceDelta):
                out.saw(event)
                for line in out.sse_delta(prompt, event, include_usage):
                    yield line
            else:
                out.add_usage(event)
        if settle is not None:
            await settle(out)
        for line in out.sse_end(include_usage):
            yield line
        out.done()
    except ModelyardError as exc:
        yield out.sse_error(exc.status, exc.body())          # an error event, never a silent cut
    except Exception as exc:  # noqa: BLE001
        log.exception("stream %s failed", out.id)
        yield out.sse_error(500, {"error": {"message": f"internal error: {type(exc).__name__}",
                                            "type": "server_error", "param": None, "code": None}})
    finally:
        await events.aclose()
    for line in out.sse_close():
        yield line


async def collect(events: AsyncIterator[Event], out: Completion, settle: Settle | None = None) -> dict:
    async for prompt, event in events:
        if isinstance(event, ChoiceDelta):
            out.saw(event)
            out.collect(prompt, event)
        else:
            out.add_usage(event)
    if settle is not None:
        await settle(out)
    out.done()
    return out.body()
