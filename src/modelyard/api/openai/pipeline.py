"""The one request pipeline behind /completions and /chat/completions.

limits -> endpoint -> engine streams, primed (request errors before any header) -> SSE or one
JSON body. The two routes differ only in how they build EngineRequests and which shapes their
`Completion` writes; everything else is here, so they cannot drift apart. /embeddings
(api/openai/embeddings) shares the endpoint lookup, deadline and ledger helpers. No accounting here:
the engines settle each request's tokens in its ledger (quota/ledger).
"""

from __future__ import annotations

import dataclasses
import time
from typing import Callable, TypeVar

from fastapi import Request
from fastapi.responses import JSONResponse, Response

from ...engine.protocol import Engine
from ...engine.types import EmbeddingRequest, EngineRequest, ModelType, SamplingParams
from ...errors import InvalidRequest
from ...settings import MAX_NAME, Limits
from ..auth import find_endpoint, is_batch
from .. import sse
from ..errors import limit_error
from .cache_scope import cached_tokens_visible
from .schemas import ErrorResponse, GenerationRequest
from .streaming import Completion, Settle, collect, merge, prime_all, to_sse

ERRORS = {400: {"model": ErrorResponse, "description": "Invalid model endpoint specified or model endpoint not ready."},
          401: {"model": ErrorResponse, "description": "Missing or invalid API key."},
          404: {"model": ErrorResponse, "description": "Unknown model endpoint requested."},
          503: {"model": ErrorResponse, "description": "The endpoint's queue is full; retry after Retry-After."}}



async def respond(request: Request, body: GenerationRequest, out: Completion, *, logprobs: int | None,
                  prompts: int, build: Callable[[float | None], list[EngineRequest]],
                  settle: Settle | None = None) -> Response:
    """Run one validated request: `build(deadline)` makes its EngineRequests, `out` its bodies;
    `settle(out)`, if given, runs once the generation has ended, before the answer's end is sent."""
    state = request.app.state
    out.on_done = reporter(request, body.model)
    out.cached_visible = cached_tokens_visible(request)
    check_limits(state.settings.limits, body.n or 1, body.stops, logprobs, prompts)
    deadline = deadline_for(request)
    # Ollama's keep_alive: completions' and chat's bodies take it (Messages and Responses do not)
    engine = await ready_engine(request, body.model, ModelType.COMPLETIONS, getattr(body, "keep_alive", None))
    reqs = with_session(request, engine, getattr(body, "user", None), build(deadline))
    events = merge(await prime_all([engine.generate(r) for r in ledgered(request, body.model, reqs)]),
                   body.n or 1)
    if body.stream:
        return sse.response(to_sse(events, out, body.include_usage, settle))
    # A client that leaves cancels this route (api/middleware/disconnect), and so the collection
    # and its engine streams: nothing here needs to watch the connection.
    return JSONResponse(await collect(events, out, settle))


def with_session(request: Request, engine: Engine, user: str | None, reqs: list[EngineRequest]) -> list[EngineRequest]:
    """A remote endpoint's replica affinity (proxy/routing): the body's `user`, else the endpoint's
    session header (bounded as `user` is)."""
    spec = getattr(engine, "spec", None)
    if spec is None or spec.engine != "openai":
        return reqs
    session = user or (request.headers.get(spec.session_header) if spec.session_header else None)
    if not session:
        return reqs
    if len(session) > MAX_NAME:
        raise InvalidRequest(f"header {spec.session_header!r} is {len(session)} characters, above the limit of "
                             f"{MAX_NAME}", param=spec.session_header)
    return [dataclasses.replace(r, session=session) for r in reqs]


async def ready_engine(request: Request, name: str, kind: ModelType, keep_alive: float | None = None) -> Engine:
    """The engine of endpoint `name`: 404 unknown (or not among the key's endpoints), 400 when
    it serves the other kind, 400 not ready. An endpoint loaded on demand is loaded first (the
    request waits, up to `[server] load_timeout`: registry.serve); the endpoint is held (never
    unloaded or evicted) until the request's response has ended, when its ledger closes.
    `keep_alive`: the request's own (Ollama's field), seconds the model stays loaded after it."""
    endpoint = find_endpoint(request, name)
    endpoint.require_type(kind, request.url.path.rsplit("/v1", 1)[-1])
    registry = request.app.state.registry
    engine = await registry.serve(endpoint, keep_alive)
    ledger = getattr(request.state, "ledger", None)
    if ledger is None:          # a route with no ledger: holds it only as long as this call
        registry.done(endpoint)
    else:
        ledger.on_close(lambda: registry.done(endpoint))
    return engine


async def tokenizing_engine(request: Request, name: str, why: str | None = None, param: str = "model"):
    """The engine of endpoint `name` when it owns a tokenizer (an embedded one: token counts,
    /tokenize, truncation). A remote endpoint's tokenizer is the upstream's: a 400 saying why,
    not a guess."""
    engine = await ready_engine(request, name, ModelType.COMPLETIONS)
    if not hasattr(engine, "tokenize"):
        raise InvalidRequest(why or f"model endpoint {name!r} is served by a remote engine; its tokenizer is the "
                             "upstream's, so this server cannot count its tokens", param=param)
    return engine


R = TypeVar("R", EngineRequest, EmbeddingRequest)


def ledgered(request: Request, endpoint: str, reqs: list[R]) -> list[R]:
    """Each engine request gets its entry in the request's ledger (quota/ledger, opened at
    admission): the engine reserves and settles through it, and nothing else counts tokens."""
    ledger = request.state.ledger
    ledger.endpoint = endpoint
    # a batch's line (batch/runner) runs at batch priority: the engine gives it what interactive
    # requests leave (issue 23)
    batch = {"priority": "batch"} if is_batch(request) else {}
    return [dataclasses.replace(r, ledger=entry, **batch) for r, entry in zip(reqs, ledger.entries_for(len(reqs)))]


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
        logprobs=logprobs, top_k=max(body.top_k or 0, 0))


def reporter(request: Request, endpoint: str) -> Callable[[Completion], None]:
    """What a finished generation tells the latency metrics and the request log (its tokens are
    the ledger's)."""
    request.state.endpoint = endpoint

    def report(out: Completion) -> None:
        request.app.state.metrics.generation(endpoint, out.t0, out.first_token, out.completion_tokens)
        request.state.log = {"id": out.id, "prompt_tokens": out.prompt_tokens,
                             "completion_tokens": out.completion_tokens,
                             "ttft_ms": round((out.first_token - out.t0) * 1000, 1) if out.first_token else None}
    return report
