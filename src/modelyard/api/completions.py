"""POST /completions: validated body -> EngineRequests -> JSON or SSE."""

from __future__ import annotations

import asyncio
import time
import uuid
from typing import Callable

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse

from ..engine.types import EngineRequest, SamplingParams
from ..errors import InvalidRequest
from ..settings import Limits
from .errors import limit_error
from .schemas import CompletionRequest, CompletionResponse, ErrorResponse, GenerationRequest
from .streaming import Completion, collect, merge, prime_all, to_sse, unless_disconnected

router = APIRouter()

ERRORS = {400: {"model": ErrorResponse, "description": "Invalid model endpoint specified or model endpoint not ready."},
          401: {"model": ErrorResponse, "description": "Missing or invalid API key."},
          404: {"model": ErrorResponse, "description": "Unknown model endpoint requested."},
          503: {"model": ErrorResponse, "description": "The endpoint's queue is full; retry after Retry-After."}}


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
        quota = getattr(request.state, "quota", None)
        if quota is not None:
            quota.spend(out.prompt_tokens + out.completion_tokens, time.monotonic())
        request.state.log = {"id": out.id, "prompt_tokens": out.prompt_tokens,
                             "completion_tokens": out.completion_tokens,
                             "ttft_ms": round((out.first_token - out.t0) * 1000, 1) if out.first_token else None}
    return report


def engine_requests(body: CompletionRequest, cmpl_id: str, deadline: float | None) -> list[EngineRequest]:
    sampling = sampling_params(body, body.logprobs)
    return [EngineRequest(request_id=f"{cmpl_id}-{i}", prompt=prompt, sampling=sampling, n=body.n or 1,
                          max_tokens=body.max_tokens or 16, stop=body.stops, echo=bool(body.echo),
                          deadline=deadline)
            for i, prompt in enumerate(body.prompts)]


@router.post("/completions", response_model=CompletionResponse, responses=ERRORS,
             summary="Create Completion")
async def create_completion(body: CompletionRequest, request: Request) -> Response:
    """Given a prompt, returns one or more predicted completions, optionally with the
    probabilities of alternative tokens at each position."""
    state = request.app.state
    report = reporter(request, body.model)
    check_limits(state.settings.limits, body.n or 1, body.stops, body.logprobs, len(body.prompts))
    engine = state.registry.get(body.model).require_ready()
    cmpl_id = f"cmpl-{uuid.uuid4().hex}"
    streams = [engine.generate(r) for r in engine_requests(body, cmpl_id, deadline_for(request))]
    out = Completion(cmpl_id, int(time.time()), body.model, body.n or 1, on_done=report)
    events = merge(await prime_all(streams))
    if body.stream:
        return StreamingResponse(to_sse(events, out, body.include_usage), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
    result = await unless_disconnected(request, asyncio.ensure_future(collect(events, out)))
    if result is None:   # the client left; nobody will read this
        return Response(status_code=499)
    return JSONResponse(result)
