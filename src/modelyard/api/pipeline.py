"""The one request pipeline behind /completions and /chat/completions.

limits -> endpoint -> engine streams, primed (request errors before any header) -> SSE or one
JSON body. The two routes differ only in how they build EngineRequests and which shapes their
`Completion` writes; everything else is here, so they cannot drift apart. /embeddings
(api/embeddings) shares the endpoint lookup, deadline and metering helpers.
"""

from __future__ import annotations

import asyncio
import dataclasses
import time
from typing import Callable, TypeVar

from fastapi import Request
from fastapi.responses import JSONResponse, Response, StreamingResponse

from ..engine.protocol import Engine
from ..engine.types import EmbeddingRequest, EngineRequest, ModelType, SamplingParams
from ..errors import InvalidRequest
from ..settings import Limits
from .auth import find_endpoint
from .errors import limit_error
from .schemas import ErrorResponse, GenerationRequest
from .streaming import Completion, collect, merge, prime_all, to_sse, unless_disconnected

ERRORS = {400: {"model": ErrorResponse, "description": "Invalid model endpoint specified or model endpoint not ready."},
          401: {"model": ErrorResponse, "description": "Missing or invalid API key."},
          404: {"model": ErrorResponse, "description": "Unknown model endpoint requested."},
          503: {"model": ErrorResponse, "description": "The endpoint's queue is full; retry after Retry-After."}}

# No proxy (nginx) may hold events back: each chunk must reach the client as it is made.
SSE_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}


async def respond(request: Request, body: GenerationRequest, out: Completion, *, logprobs: int | None,
                  prompts: int, build: Callable[[float | None], list[EngineRequest]]) -> Response:
    """Run one validated request: `build(deadline)` makes its EngineRequests, `out` its bodies."""
    state = request.app.state
    out.on_done = reporter(request, body.model)
    check_limits(state.settings.limits, body.n or 1, body.stops, logprobs, prompts)
    deadline = deadline_for(request)
    engine = ready_engine(request, body.model, ModelType.COMPLETIONS)
    events = merge(await prime_all([engine.generate(r) for r in metered(request, build(deadline))]), body.n or 1)
    if body.stream:
        return StreamingResponse(to_sse(events, out, body.include_usage), media_type="text/event-stream",
                                 headers=SSE_HEADERS)
    result = await unless_disconnected(request, asyncio.ensure_future(collect(events, out)))
    if result is None:   # the client left; nobody will read this
        return Response(status_code=499)
    return JSONResponse(result)


def ready_engine(request: Request, name: str, kind: ModelType) -> Engine:
    """The engine of endpoint `name`: 404 unknown (or not among the key's endpoints), 400 when
    it serves the other kind, 400 not ready."""
    endpoint = find_endpoint(request, name)
    endpoint.require_type(kind, request.url.path.rsplit("/v1", 1)[-1])
    return endpoint.require_ready()


R = TypeVar("R", EngineRequest, EmbeddingRequest)


def metered(request: Request, reqs: list[R]) -> list[R]:
    """Give each engine request its key's meter (tpm, a budget): the engine reserves before any
    work and settles when the request ends (quota/policy). With the control plane's usage on,
    every request is also watched for ending without its usage (CutShort)."""
    quota = getattr(request.state, "quota", None)
    usage = getattr(request.app.state, "usage", None)
    if quota is None or (not quota.metered and usage is None):
        return reqs
    out = []
    cut = None
    if usage is not None:
        cut = request.state.cut_short = CutShort(
            lambda tokens: usage.record(quota.key_id, getattr(request.state, "endpoint", "-"), tokens, 0))
    meters = [Meter(quota) for _ in reqs] if quota.metered else []
    if meters:
        request.state.meters = meters
    for i, r in enumerate(reqs):
        meter = meters[i] if meters else None
        settle = meter.settle if meter is not None else None
        if cut is not None:
            settle = cut.watch(settle)
        out.append(dataclasses.replace(r, reserve=meter.reserve if meter is not None else _unmetered, settle=settle))
    return out


async def _unmetered(tokens: int) -> None:
    """The reserve of a key with no token limit: nothing to hold (the engine still settles)."""


class Meter:
    """An engine's reserve/settle hooks on the key's quota (quota/policy.KeyQuota): reserve is
    awaited by the engine; settle is called synchronously on the loop and runs the quota's settle
    as a task (kept by the quota backend until done)."""

    def __init__(self, quota) -> None:
        self.quota, self.reservation = quota, None

    async def reserve(self, tokens: int) -> None:
        self.reservation = await self.quota.reserve(tokens)

    def settle(self, tokens: int) -> None:
        if self.reservation is not None:
            self.quota.backend.background.spawn(self.quota.settle(self.reservation, tokens))


class CutShort:
    """The usage of a request that ended without its last event (its client left, it failed
    or timed out): an engine settles each request exactly once, however it ended, with the
    tokens it computed (prompt prefilled + generated). If the route never accounted the
    request (`account`), those tokens are recorded, all as prompt tokens: the split between
    prompt and completion comes only with the engine's last event. A settle can come before or
    after the response has ended (an aborted request is retired on the engine thread), so the
    tokens are recorded at whichever comes last, once; without this, a client could stream
    and leave before the end and never be counted (usage, budgets)."""

    __slots__ = ("record", "accounted", "ended", "pending")

    def __init__(self, record: Callable[[int], None]) -> None:
        self.record, self.accounted, self.ended, self.pending = record, False, False, 0

    def watch(self, settle: Callable[[int], None] | None) -> Callable[[int], None]:
        def settled(tokens: int) -> None:
            if settle is not None:
                settle(tokens)
            if self.accounted:
                return
            if self.ended:
                self.record(tokens)
            else:
                self.pending += tokens
        return settled

    def end(self) -> None:
        """The response has ended (api/middleware.ReleaseSlot)."""
        self.ended = True
        if not self.accounted and self.pending:
            self.record(self.pending)
            self.pending = 0


def check_limits(limits: Limits, n: int, stops: tuple[str, ...], logprobs: int | None, prompts: int) -> None:
    """The server's own limits (settings), reported as 422s on the offending field."""
    if n > limits.max_n:
        raise limit_error("n", n, limits.max_n, "n")
    if len(stops) > limits.max_stop:
        raise limit_error("stop", len(stops), limits.max_stop, "the number of stop strings")
    longest = max((len(s) for s in stops), default=0)
    if longest > limits.max_stop_chars:
        raise limit_error("stop", longest, limits.max_stop_chars, "the length of a stop string")
    if prompts > limits.max_prompts:
        raise limit_error("prompt", prompts, limits.max_prompts, "the number of prompts")
    if logprobs is not None and logprobs > limits.max_logprobs:
        raise limit_error("logprobs", logprobs, limits.max_logprobs, "logprobs")


def deadline_for(request: Request) -> float | None:
    """The request's time limit: the server's setting, shortened by an X-Request-Timeout header."""
    limits = [request.app.state.settings.request_timeout or None]
    header = request.headers.get("x-request-timeout")
    if header:
        try:
            limits.append(float(header))
        except ValueError:
            raise InvalidRequest(f"X-Request-Timeout must be a number of seconds, got {header!r}",
                                 param="X-Request-Timeout") from None
    given = [t for t in limits if t]
    return time.monotonic() + min(given) if given else None


def sampling_params(body: GenerationRequest, logprobs: int | None) -> SamplingParams:
    """Sampling fields shared by /completions and /chat/completions; absent means default."""
    return SamplingParams(
        temperature=body.temperature if body.temperature is not None else 0.0,
        top_p=body.top_p if body.top_p is not None else 1.0,
        seed=body.seed,
        presence_penalty=body.presence_penalty or 0.0,
        frequency_penalty=body.frequency_penalty or 0.0,
        logit_bias={int(k): v for k, v in (body.logit_bias or {}).items()},
        logprobs=logprobs)


def reporter(request: Request, endpoint: str) -> Callable[[Completion], None]:
    """What a finished generation tells the metrics and the request log."""
    request.state.endpoint = endpoint

    def report(out: Completion) -> None:
        request.app.state.metrics.generation(endpoint, out.t0, out.first_token, out.prompt_tokens,
                                             out.completion_tokens)
        account(request, endpoint, out.prompt_tokens, out.completion_tokens)
        request.state.log = {"id": out.id, "prompt_tokens": out.prompt_tokens,
                             "completion_tokens": out.completion_tokens,
                             "ttft_ms": round((out.first_token - out.t0) * 1000, 1) if out.first_token else None}
    return report


def account(request: Request, endpoint: str, prompt_tokens: int, completion_tokens: int) -> None:
    """A finished request's tokens: the key's tpm if its engine did not meter, and its usage
    (control plane: kept in memory, flushed to the store every few seconds)."""
    charge_unmetered(request, prompt_tokens + completion_tokens)
    cut = getattr(request.state, "cut_short", None)
    if cut is not None:
        cut.accounted = True        # its exact usage is recorded here
    usage = getattr(request.app.state, "usage", None)
    quota = getattr(request.state, "quota", None)
    if usage is not None and quota is not None:
        usage.record(quota.key_id, endpoint, prompt_tokens, completion_tokens)


def charge_unmetered(request: Request, tokens: int) -> None:
    """After the fact, the tokens of a request whose engine did not meter (a remote one: only
    the upstream tokenizes, so nothing is known before its answer)."""
    meters = getattr(request.state, "meters", [])
    if meters and not any(m.reservation for m in meters):
        quota = request.state.quota
        quota.backend.background.spawn(quota.settle(None, tokens))
