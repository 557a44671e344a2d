"""ProxyEngine: the Engine protocol over remote OpenAI-compatible servers.

Every request streams from the upstream (one code path; non-streaming callers aggregate our
events). The replicas, their probes and the choice among them are proxy/replicas'; what is sent
and how the answer is read, proxy/wire's; failures, proxy/errors'. This module holds what one
request does: reserve in its ledger, send, relay, settle.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from typing import Any, AsyncIterator, Awaitable, Callable

import httpx

from ..engine.types import EmbeddingRequest, EmbeddingResult, EngineOutput, EngineRequest, ModelType
from ..errors import DeadlineExceeded
from ..settings import EndpointSpec
from .batch_share import BatchShare
from .embeddings import embedding_body, read_embeddings
from .errors import map_error
from .lifecycle import UpstreamSleeper
from .replicas import DROPPED_ERRORS, HEALTH_INTERVAL, ReplicaPool, Route
from .routing import prompt_text
from .sse import SSEError
from .wire import Tally, completion_bound, prompt_bound, relay, request_body, text_bound


class ProxyEngine:
    model_engine = "OPENAI_PROXY"

    def __init__(self, spec: EndpointSpec, transport: httpx.AsyncBaseTransport | None = None, *,
                 health_interval: float = HEALTH_INTERVAL) -> None:
        self.spec = spec
        # An upstream's kind cannot be probed reliably (OpenAI's /models does not say): configured.
        self.model_type = ModelType.EMBEDDINGS if spec.kind == "embeddings" else ModelType.COMPLETIONS
        self.pool = ReplicaPool(spec, transport, health_interval=health_interval)
        self.batch_share = BatchShare(spec)
        # load = "on_demand": requests held while no replica is up, the upstream woken and put to
        # sleep by keep_alive (proxy/lifecycle); the registry sets its hold_timeout
        self.sleeper = UpstreamSleeper(spec, self.pool) if spec.load == "on_demand" else None

    async def start(self) -> None:
        await self.pool.start()
        if self.sleeper is not None:
            self.sleeper.start()

    async def stop(self) -> None:
        if self.sleeper is not None:
            await self.sleeper.stop()
        await self.pool.stop()

    async def probe_all(self) -> None:
        await self.pool.probe_all()

    def ready_reason(self) -> str | None:
        # on demand, a request is held while the replicas come up: not a reason to refuse it
        return None if self.sleeper is not None else self.pool.ready_reason()

    def status(self) -> dict[str, Any]:
        return {**self.pool.status(), **self.batch_share.status(),
                **(self.sleeper.status() if self.sleeper is not None else {})}

    async def generate(self, request: EngineRequest) -> AsyncIterator[EngineOutput]:
        # aclosing: a consumer that leaves early closes the upstream request at once, as before
        async with contextlib.AsyncExitStack() as stack:
            if request.priority == "batch":     # at most its share of the capacity (batch_share)
                await stack.enter_async_context(self.batch_share.hold(request.deadline))
            async with contextlib.aclosing(self._generate(request)) as outputs:
                async for out in outputs:
                    yield out

    async def _generate(self, request: EngineRequest) -> AsyncIterator[EngineOutput]:
        # The prompt's tokens are the upstream's to count, so the reservation is a bound (see
        # prompt_bound) plus, per choice, the max_tokens the upstream is sent: always sent, so
        # that whatever is reserved is what the upstream may generate (a chat without max_tokens
        # gets the room the prompt's bound leaves in the endpoint's context; an upstream left
        # to its own default would generate up to its whole context, vLLM's max_model_len). The
        # settlement is what the upstream reports, or, for a stream cut short, the bound plus
        # the tokens seen. An upstream that refused the request computed nothing: 0.
        bound = prompt_bound(request)
        per_choice = completion_bound(self.spec, request, bound)
        if request.ledger is not None:
            await request.ledger.reserve(bound + request.n * per_choice)
        tally = Tally()
        replica = resp = None
        held = False
        try:
            if self.sleeper is not None:
                await self.sleeper.before()
                held = True
            path = "/chat/completions" if request.messages is not None else "/completions"
            body = request_body(self.spec, request, per_choice)
            # the prompt's text is serialized only for the policy that routes on it
            text = prompt_text(body) if self.spec.balance == "prefix" else None
            route = Route(text, request.session, request.cache_partition)
            # An answer whose connection dies before its first event (an engine killed while it
            # prefilled: its headers were out, nothing else) was seen by nobody: it is sent
            # again, as the pool resends a request dropped before its headers. Once an event has
            # been relayed, a failure is the client's error: output is never repeated.
            for tries_left in range(len(self.pool.replicas), -1, -1):
                replica, resp = await self.pool.send(path, body, request.deadline, route)
                if not resp.is_success:
                    await resp.aread()
                    raise map_error(replica.url, resp, secret=self.spec.api_key)
                tally.started = True
                relayed = False
                try:
                    async for out in relay(replica.url, resp, request, tally, self.spec.api_key):
                        relayed = True
                        yield out
                    break
                except DROPPED_ERRORS:
                    if relayed or not tries_left:
                        raise
                replica.dropped += 1
                await self.pool.release(replica, resp)
                replica = resp = None
        except (httpx.HTTPError, SSEError) as exc:
            raise map_error(replica.url if replica else self.spec.name, exc, request.deadline,
                            secret=self.spec.api_key) from exc
        finally:
            if request.ledger is not None:
                request.ledger.settle(*tally.used(bound))
            if held:
                self.sleeper.after()
            await self.pool.release(replica, resp)

    async def embed(self, request: EmbeddingRequest) -> EmbeddingResult:
        """POST /embeddings upstream: the same replica choice, retries and error mapping as
        generate; the answer is checked (one finite vector per input) before anyone sees it.
        tpm as generate: each input's bound reserved, settled to the upstream's count (0 if it
        refused, the bound if it answered without one)."""
        async with contextlib.AsyncExitStack() as stack:
            if request.priority == "batch":     # at most its share of the capacity (batch_share)
                await stack.enter_async_context(self.batch_share.hold(request.deadline))
            return await self._embed(request)

    async def _embed(self, request: EmbeddingRequest) -> EmbeddingResult:
        bound = sum(text_bound(x) for x in request.inputs)
        if request.ledger is not None:
            await request.ledger.reserve(bound)
        used = 0
        replica = resp = None
        held = False
        try:
            if self.sleeper is not None:
                await self.sleeper.before()
                held = True
            replica, resp = await self.pool.send("/embeddings", embedding_body(self.spec, request), request.deadline)
            if not resp.is_success:
                await _until(resp.aread(), request.deadline)
                raise map_error(replica.url, resp, secret=self.spec.api_key)
            used = bound
            await _until(resp.aread(), request.deadline)
            result = read_embeddings(replica.url, resp, request)
            used = result.prompt_tokens or bound
            return result
        except httpx.HTTPError as exc:
            raise map_error(replica.url if replica else self.spec.name, exc, request.deadline,
                            secret=self.spec.api_key) from exc
        finally:
            if request.ledger is not None:
                request.ledger.settle(used, 0)
            if held:
                self.sleeper.after()
            await self.pool.release(replica, resp)


    async def forward(self, path: str, deadline: float | None, *, root: bool = False, body: dict | None = None,
                      **request: Any) -> "Forwarded":
        """A route modelyard does not implement, passed to a replica as it came (api/openai/
        passthrough): the upstream's answer, opened; its error (before any byte) mapped. On
        demand, the upstream is woken first and counted busy until the answer is closed."""
        if self.sleeper is not None:
            await self.sleeper.before()
        after = self.sleeper.after if self.sleeper is not None else (lambda: None)
        try:
            replica, resp = await self.pool.send(path, body, deadline, root=root, **request)
        except BaseException:
            after()
            raise
        if not resp.is_success:
            try:
                await _until(resp.aread(), deadline)
                raise map_error(replica.url, resp, secret=self.spec.api_key)
            finally:
                after()
                await self.pool.release(replica, resp)
        return Forwarded(replica, resp, after, self.pool.release)


class Forwarded:
    """An upstream answer being passed through: its replica's in-flight count (and, on demand,
    the upstream's keep-awake) until closed."""

    def __init__(self, replica, resp: httpx.Response, after: Callable[[], None],
                 release: Callable[[Any, httpx.Response], Awaitable[None]]) -> None:
        self.replica, self.resp, self._after, self._release = replica, resp, after, release
        self._open = True

    async def close(self) -> None:
        if self._open:
            self._open = False
            self._after()
            await self._release(self.replica, self.resp)


async def _until(work, deadline: float | None):
    """`work`, or DeadlineExceeded once the request's deadline passes (httpx's timeouts bound
    each read, not the whole answer)."""
    if deadline is None:
        return await work
    try:
        return await asyncio.wait_for(work, max(0.0, deadline - time.monotonic()))
    except asyncio.TimeoutError:
        raise DeadlineExceeded("request deadline passed while waiting for the upstream's embeddings") from None
