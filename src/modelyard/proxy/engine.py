"""ProxyEngine: the Engine protocol over remote OpenAI-compatible servers (DESIGN.md, "The upstream engine").

Every request streams from the upstream (one code path; non-streaming callers aggregate our
events). Replicas are probed in the background; a request goes to the least busy healthy one,
and moves on only when the connection failed before the upstream saw anything.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import logging
import os
import re
import time
from dataclasses import asdict, dataclass
from typing import Any, AsyncIterator

import httpx

from ..engine.types import (ChoiceDelta, EmbeddingRequest, EmbeddingResult, EngineOutput, EngineRequest,
                            FinishReason, ModelType, TokenLogprobs, Usage)
from ..errors import (DeadlineExceeded, EndpointNotReady, ModelyardError, Upstream4xx, UpstreamError,
                      UpstreamTimeout)
from ..settings import EndpointSpec
from .embeddings import embedding_body, read_embeddings
from .sse import SSEError, json_events
from .structured import constraint_fields

log = logging.getLogger(__name__)

CONNECT_TIMEOUT = 5.0       # a replica that cannot accept a connection in 5 s is as good as down
PROBE_TIMEOUT = 2.0
HEALTH_INTERVAL = 2.0
# A replica that accepted the probe's connection but did not answer in time is busy, maybe not
# down (llama-cpp-python's server answers /models only between generations): it is marked down
# after this many such probes in a row. Refused or unreachable: down at once.
SLOW_PROBES_TO_DOWN = 3
# Generous: each streaming request holds one connection for its whole length.
POOL_LIMITS = httpx.Limits(max_connections=1024, max_keepalive_connections=256, keepalive_expiry=30.0)
# Only these happen before the upstream saw the request, so only these are safe to retry.
CONNECT_ERRORS = (httpx.ConnectError, httpx.ConnectTimeout)
# tpm reservation of a chat prompt: per message, room for its role markup (and once for the
# generation prompt); generous, since the settlement corrects it to what the upstream counted.
CHAT_MARKUP_TOKENS = 16


@dataclass(eq=False)
class Replica:
    url: str                              # base URL, e.g. http://host:8001/v1
    healthy: bool = False
    in_flight: int = 0
    last_error: str | None = "not probed yet"
    slow_probes: int = 0                  # probes in a row that connected but timed out

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


class ProxyEngine:
    model_engine = "OPENAI_PROXY"

    def __init__(self, spec: EndpointSpec, transport: httpx.AsyncBaseTransport | None = None, *,
                 health_interval: float = HEALTH_INTERVAL) -> None:
        self.spec = spec
        # An upstream's kind cannot be probed reliably (OpenAI's /models does not say): configured.
        self.model_type = ModelType.EMBEDDINGS if spec.kind == "embeddings" else ModelType.COMPLETIONS
        self._transport = transport
        self._interval = health_interval
        self._replicas = [Replica(url.rstrip("/")) for url in spec.urls]
        self._turn = itertools.count()    # breaks ties between equally loaded replicas
        self._client: httpx.AsyncClient | None = None
        self._health: asyncio.Task | None = None

    async def start(self) -> None:
        headers = {"Authorization": f"Bearer {self.spec.api_key}"} if self.spec.api_key else {}
        # trust_env=False: settings are the only reader of the environment (no proxy vars).
        self._client = httpx.AsyncClient(
            transport=self._transport, headers=headers, limits=POOL_LIMITS, trust_env=False,
            timeout=httpx.Timeout(self.spec.timeout, connect=CONNECT_TIMEOUT))
        # No replica answering is not a start failure: the endpoint is just not ready yet.
        await self.probe_all()
        self._health = asyncio.create_task(self._health_loop(), name=f"health:{self.spec.name}")

    async def stop(self) -> None:
        task, self._health = self._health, None
        if task is not None:
            task.cancel()
            await asyncio.wait([task])
        client, self._client = self._client, None
        if client is not None:
            await client.aclose()

    async def probe(self, replica: Replica) -> None:
        """One health check: GET base/models; healthy on 2xx."""
        try:
            resp = await self._need_client().get(replica.url + "/models", timeout=PROBE_TIMEOUT)
        except (httpx.ReadTimeout, httpx.WriteTimeout) as exc:
            replica.slow_probes += 1
            if not replica.healthy or replica.slow_probes >= SLOW_PROBES_TO_DOWN:
                self._mark_down(replica, _reason(exc))
            else:
                log.info("endpoint %s: replica %s was slow to answer a probe (%d in a row)",
                         self.spec.name, replica.url, replica.slow_probes)
            return
        except httpx.HTTPError as exc:
            self._mark_down(replica, _reason(exc))
            return
        replica.slow_probes = 0
        if resp.is_success:
            replica.healthy, replica.last_error = True, None
        else:
            self._mark_down(replica, f"HTTP {resp.status_code}")

    async def probe_all(self) -> None:
        await asyncio.gather(*(self.probe(r) for r in self._replicas))

    async def _health_loop(self) -> None:
        while True:
            await asyncio.sleep(self._interval)
            try:
                await self.probe_all()
            except Exception:  # the loop must outlive any surprise, or readiness freezes
                log.exception("health probe of endpoint %s failed", self.spec.name)

    def _mark_down(self, replica: Replica, reason: str) -> None:
        if replica.healthy:
            log.warning("endpoint %s: replica %s is down: %s", self.spec.name, replica.url, reason)
        replica.healthy, replica.last_error = False, reason

    def ready_reason(self) -> str | None:
        if any(r.healthy for r in self._replicas):
            return None
        return "no replica answers: " + "; ".join(f"{r.url}: {r.last_error}" for r in self._replicas)

    def status(self) -> dict[str, Any]:
        return {"replicas": [r.as_dict() for r in self._replicas],
                "in_flight": sum(r.in_flight for r in self._replicas)}

    async def generate(self, request: EngineRequest) -> AsyncIterator[EngineOutput]:
        # tpm: the prompt's tokens are the upstream's to count, so the reservation is a bound
        # (see prompt_bound) plus max_tokens per choice (unset: the endpoint's `context`), and the
        # settlement is what the upstream reports, or, for a stream cut short, the bound plus the
        # tokens seen. An upstream that refused the request computed nothing: 0.
        bound = prompt_bound(request)
        if request.reserve is not None:
            await request.reserve(bound + request.n * (request.max_tokens or self.spec.context))
        tally = Tally()
        replica = resp = None
        try:
            path = "/chat/completions" if request.messages is not None else "/completions"
            replica, resp = await self._send(path, request_body(self.spec, request), request.deadline)
            if not resp.is_success:
                await resp.aread()
                raise map_error(replica.url, resp, secret=self.spec.api_key)
            tally.started = True
            async for out in _relay(replica.url, resp, request, tally, self.spec.api_key):
                yield out
        except (httpx.HTTPError, SSEError) as exc:
            raise map_error(replica.url if replica else self.spec.name, exc, request.deadline,
                            secret=self.spec.api_key) from exc
        finally:
            if request.settle is not None:
                request.settle(tally.used(bound))
            if replica is not None:
                replica.in_flight -= 1
            if resp is not None:
                await resp.aclose()   # releases (or, mid-stream, drops) the upstream connection

    async def embed(self, request: EmbeddingRequest) -> EmbeddingResult:
        """POST /embeddings upstream: the same replica choice, retries and error mapping as
        generate; the answer is checked (one finite vector per input) before anyone sees it.
        tpm as generate: each input's bound reserved, settled to the upstream's count (0 if it
        refused, the bound if it answered without one)."""
        bound = sum(text_bound(x) for x in request.inputs)
        if request.reserve is not None:
            await request.reserve(bound)
        used = 0
        replica = resp = None
        try:
            replica, resp = await self._send("/embeddings", embedding_body(self.spec, request), request.deadline)
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
            if request.settle is not None:
                request.settle(used)
            if replica is not None:
                replica.in_flight -= 1
            if resp is not None:
                await resp.aclose()

    async def _send(self, path: str, body: dict, deadline: float | None) -> tuple[Replica, httpx.Response]:
        """Open the upstream stream on the least busy healthy replica, trying the next on connect errors."""
        client = self._need_client()
        tried: list[Replica] = []
        while (replica := self._pick(tried)) is not None:
            tried.append(replica)
            replica.in_flight += 1
            opened = False
            try:
                request = client.build_request("POST", replica.url + path, json=body,
                                               timeout=_timeout(self.spec.timeout, deadline))
                resp = await client.send(request, stream=True)
                opened = True
                return replica, resp
            except CONNECT_ERRORS as exc:
                self._mark_down(replica, _reason(exc))
            except httpx.HTTPError as exc:
                raise map_error(replica.url, exc, deadline) from exc
            finally:
                if not opened:
                    replica.in_flight -= 1
        raise EndpointNotReady(self.ready_reason() or "no replica answers")

    def _pick(self, tried: list[Replica]) -> Replica | None:
        live = [r for r in self._replicas if r.healthy and r not in tried]
        if not live:
            return None
        least = min(r.in_flight for r in live)
        tied = [r for r in live if r.in_flight == least]
        return tied[next(self._turn) % len(tied)]

    def _need_client(self) -> httpx.AsyncClient:
        if self._client is None:
            raise EndpointNotReady(f"endpoint {self.spec.name!r} is not started")
        return self._client


def request_body(spec: EndpointSpec, req: EngineRequest) -> dict[str, Any]:
    """The upstream completions body; optional fields only when set, for picky servers."""
    s = req.sampling
    body: dict[str, Any] = {
        "model": spec.upstream_model or spec.name,
        "n": req.n,
        "temperature": s.temperature, "top_p": s.top_p,
        "presence_penalty": s.presence_penalty, "frequency_penalty": s.frequency_penalty,
        "stream": True, "stream_options": {"include_usage": True},
    }
    if req.messages is not None:
        body["messages"] = list(req.messages)
        if s.logprobs is not None:
            body["logprobs"], body["top_logprobs"] = True, s.logprobs
    else:
        body["prompt"] = req.prompt if isinstance(req.prompt, str) else list(req.prompt)
        if s.logprobs is not None:
            body["logprobs"] = s.logprobs
    if req.max_tokens is not None:   # unset (chat): the upstream's own default, not ours
        body["max_tokens"] = req.max_tokens
    if req.stop:
        body["stop"] = list(req.stop)
    if req.echo:
        body["echo"] = True
    if s.seed is not None:
        body["seed"] = s.seed
    if s.logit_bias:
        body["logit_bias"] = {str(k): v for k, v in s.logit_bias.items()}
    if req.tools:
        # The upstream calls tools itself (its template renders them, its parser finds the calls,
        # "auto" included): tools and tool_choice go as sent, and its tool-call deltas come back.
        body["tools"], body["tool_choice"] = list(req.tools), req.tool_choice
    if req.constraint is not None and req.constraint.field != "tools":
        body.update(constraint_fields(spec.upstream_server, spec.name, req.constraint))
    return body


@dataclass
class Tally:
    """What one upstream request used, for its tpm settlement."""
    started: bool = False            # the upstream accepted it
    seen: int = 0                    # completion tokens seen in its chunks
    usage: Usage | None = None       # what it reported

    def used(self, prompt_bound: int) -> int:
        if self.usage is not None and self.usage.prompt_tokens:
            return self.usage.prompt_tokens + self.usage.completion_tokens
        return prompt_bound + self.seen if self.started else 0


def prompt_bound(req: EngineRequest) -> int:
    """At most this many prompt tokens: every token of the tokenizers upstreams run (byte-level
    BPE, SentencePiece with byte fallback, WordPiece) covers at least one byte, plus room for the
    specials a tokenizer or a chat template adds."""
    if req.messages is not None:
        return sum(len(str(m.get("content") or "").encode()) + CHAT_MARKUP_TOKENS for m in req.messages) \
            + CHAT_MARKUP_TOKENS
    return text_bound(req.prompt)


def text_bound(prompt: str | tuple[int, ...]) -> int:
    """prompt_bound of one text (or token-id) prompt or embeddings input."""
    if isinstance(prompt, tuple):
        return len(prompt)
    return len(prompt.encode()) + 2


async def _relay(url: str, resp: httpx.Response, req: EngineRequest, tally: Tally,
                 secret: str | None = None) -> AsyncIterator[EngineOutput]:
    """Upstream chunks -> ChoiceDelta events, then one Usage; a stream cut short raises."""
    finished: set[int] = set()
    usage: dict | None = None
    async for event in json_events(resp.aiter_lines()):
        if req.deadline is not None and time.monotonic() > req.deadline:
            raise DeadlineExceeded("request deadline passed while the upstream was generating")
        if event.get("error") or event.get("object") == "error":
            why = _error_message(event) or json.dumps(event)[:300]
            raise UpstreamError(f"upstream {url} failed mid-stream: {redact(why, secret)}")
        for delta in read_chunk(event, req.n):
            tally.seen += len(delta.logprobs.tokens) if delta.logprobs else int(bool(delta.text))
            if delta.finish_reason is not None:
                finished.add(delta.index)
            yield delta
        usage = event.get("usage") or usage
    missing = sorted(set(range(req.n)) - finished)
    if missing:
        raise UpstreamError(f"upstream {url} ended the stream before choices {missing} finished")
    # An upstream that ignored include_usage gets what we saw: no prompt count, and one
    # completion token per content chunk (per logprobs token when present).
    tally.usage = read_usage(usage) if usage is not None else Usage(0, tally.seen)
    yield tally.usage


# Foreign JSON read with plain indexing raises one of these when its shape is wrong.
_SHAPE_ERRORS = (AttributeError, KeyError, TypeError, ValueError)


def read_chunk(event: dict, n: int) -> list[ChoiceDelta]:
    """The choice deltas of one upstream chunk; SSEError (a 502, or an error event once the
    stream has started) when the chunk is not the shape OpenAI's API defines."""
    try:
        deltas = [d for d in (to_delta(raw) for raw in event.get("choices") or ()) if d is not None]
    except _SHAPE_ERRORS as exc:
        raise SSEError(f"upstream sent a malformed chunk ({type(exc).__name__}: {exc}): "
                       f"{json.dumps(event)[:200]}") from None
    wrong = [d.index for d in deltas if not 0 <= d.index < n]
    if wrong:
        raise SSEError(f"upstream sent choice index {wrong[0]}, but {n} choice(s) were asked for")
    return deltas


def read_usage(usage: Any) -> Usage:
    try:
        return Usage(int(usage.get("prompt_tokens") or 0), int(usage.get("completion_tokens") or 0))
    except _SHAPE_ERRORS:
        raise SSEError(f"upstream sent malformed usage: {json.dumps(usage)[:200]}") from None


# OpenAI's finish reasons pass through as they are. Other servers' names for the same things
# (TGI's) are translated. vLLM's "abort" means the upstream dropped the choice unfinished: an
# error, not a stop. Anything else is a malformed chunk.
FINISH_REASONS = {r.value: r for r in FinishReason} | {
    "eos_token": FinishReason.STOP, "stop_sequence": FinishReason.STOP}


def finish_reason(reason: Any) -> FinishReason | None:
    if reason is None:
        return None
    if reason == "abort":
        raise UpstreamError("upstream aborted the generation before it finished (finish_reason 'abort')")
    if reason not in FINISH_REASONS:
        raise SSEError(f"upstream sent an unknown finish_reason: {json.dumps(reason)[:100]}")
    return FINISH_REASONS[reason]


def to_delta(raw: dict) -> ChoiceDelta | None:
    """One upstream choice chunk; None when it carries nothing (some servers send empty ones)."""
    calls = None
    if "delta" in raw:   # a chat chunk
        text = raw["delta"].get("content") or ""
        logprobs = chat_to_logprobs(raw.get("logprobs"))
        calls = tool_call_parts(raw["delta"].get("tool_calls"))
    elif "message" in raw:   # a whole chat answer sent as one chunk (some servers do)
        text = raw["message"].get("content") or ""
        logprobs = chat_to_logprobs(raw.get("logprobs"))
        calls = tool_call_parts(raw["message"].get("tool_calls"))
    else:
        text = raw.get("text") or ""
        logprobs = to_logprobs(raw.get("logprobs"))
    finish = finish_reason(raw.get("finish_reason"))
    if not isinstance(text, str):
        raise TypeError(f"text/content is {type(text).__name__}, not a string")
    if not text and logprobs is None and finish is None and not calls:
        return None
    return ChoiceDelta(int(raw.get("index") or 0), text, logprobs, finish, calls)


def tool_call_parts(raw: Any) -> tuple[dict, ...] | None:
    """An upstream's tool-call deltas, checked: each a dict whose function's name and arguments
    (when present) are strings."""
    if not raw:
        return None
    parts = []
    for i, part in enumerate(raw):
        fn = part.get("function") or {}
        for key in ("name", "arguments"):
            if fn.get(key) is not None and not isinstance(fn[key], str):
                raise TypeError(f"tool_calls[{i}].function.{key} is {type(fn[key]).__name__}, not a string")
        parts.append({"index": int(part.get("index", i)), "id": part.get("id"),
                      "function": {k: fn[k] for k in ("name", "arguments") if fn.get(k) is not None}})
    return tuple(parts)


def chat_to_logprobs(raw: dict | None) -> TokenLogprobs | None:
    """Chat's {"content": [{"token", "logprob", "top_logprobs": [...]}]} in our one shape."""
    items = (raw or {}).get("content") or []
    if not items:
        return None
    return TokenLogprobs(_strings([i["token"] for i in items]), [i.get("logprob") for i in items],
                         [{t["token"]: t["logprob"] for t in i.get("top_logprobs") or []} for i in items],
                         [0] * len(items))


def to_logprobs(raw: dict | None) -> TokenLogprobs | None:
    if not raw or not raw.get("tokens"):
        return None
    n = len(raw["tokens"])
    aligned = [(list(raw.get(key) or []) + [fill] * n)[:n]      # keep the four lists aligned
               for key, fill in (("token_logprobs", None), ("top_logprobs", None), ("text_offset", 0))]
    return TokenLogprobs(_strings(raw["tokens"]), *aligned)


def _strings(tokens: Any) -> list[str]:
    if not isinstance(tokens, list) or not all(isinstance(t, str) for t in tokens):
        raise TypeError("logprobs tokens must be a list of strings")
    return tokens


# Upstream answers that blame our configuration (its key, its model name, its URL), not the
# client's request: passing them on would tell the client that ITS key or model is wrong.
# They are 502s saying what the upstream said. Other 4xx (400, 413, 422, 429) are about the
# request and keep their status.
MISCONFIGURED = {401: "rejected this endpoint's API key", 402: "refused payment", 403: "forbade the request",
                 404: "does not know the model or route", 405: "does not allow the method",
                 407: "wants proxy credentials"}


def map_error(url: str, failure: httpx.Response | BaseException,
              deadline: float | None = None, secret: str | None = None) -> ModelyardError:
    """The one translation of an upstream failure (an error response or an exception) to ours.
    `secret`, the key we send upstream, never appears in what we pass on."""
    if isinstance(failure, httpx.Response):
        try:
            body = failure.json()
        except ValueError:
            body = None
        status = failure.status_code
        message = redact(_error_message(body) or failure.text.strip()[:500] or f"HTTP {status}", secret)
        if status in MISCONFIGURED:
            return UpstreamError(f"upstream {url} {MISCONFIGURED[status]} (HTTP {status}): {message}; "
                                 "check this endpoint's configuration", code="upstream_misconfigured")
        if 400 <= status < 500:
            retry = failure.headers.get("retry-after", "")   # e.g. an upstream 429
            return Upstream4xx(message, upstream_status=status,
                               retry_after=float(retry) if retry.isdigit() else None)
        return UpstreamError(f"upstream {url} answered {status}: {message}")
    if isinstance(failure, httpx.TimeoutException):
        if deadline is not None and time.monotonic() >= deadline:
            return DeadlineExceeded("request deadline passed while waiting for the upstream")
        return UpstreamTimeout(f"upstream {url} timed out ({_reason(failure)})")
    return UpstreamError(f"upstream {url} failed: {redact(_reason(failure), secret)}")


# What an upstream may echo of a key: ours verbatim, or a masked one such as OpenAI's
# "Incorrect API key provided: sk-proj-****...1234" (prefix and last digits are still ours).
_KEY_LIKE = re.compile(r"\bsk-[^\s'\",;]*|\bBearer\s+\S+|\S*\*{3,}\S*", re.IGNORECASE)


MAX_UPSTREAM_MESSAGE = 500     # characters of an upstream's error text passed on


def redact(message: str, secret: str | None) -> str:
    """An upstream's error text as we pass it on: our key out (first, so that no cut can leave a
    part of it), then cut to MAX_UPSTREAM_MESSAGE before any pattern runs (an upstream, or
    whoever answers in its place, chooses the text: _KEY_LIKE's runs of non-spaces are
    quadratic on one long word), then key-like words out."""
    if secret:
        message = message.replace(secret, "[redacted]")
    if len(message) > MAX_UPSTREAM_MESSAGE:
        message = message[:MAX_UPSTREAM_MESSAGE] + "..."
    return _KEY_LIKE.sub("[redacted]", message)


def _error_message(body: Any) -> str:
    """The message in an OpenAI ({"error": {...}}), TGI ({"error": "..."}) or FastAPI ({"detail"}) body."""
    if not isinstance(body, dict):
        return ""
    err = body.get("error", body)
    if isinstance(err, str):
        return err
    if isinstance(err, dict):
        for key in ("message", "detail"):
            value = err.get(key)
            if value:
                return value if isinstance(value, str) else json.dumps(value)[:500]
    return ""


async def _until(work, deadline: float | None):
    """`work`, or DeadlineExceeded once the request's deadline passes (httpx's timeouts bound
    each read, not the whole answer)."""
    if deadline is None:
        return await work
    try:
        return await asyncio.wait_for(work, max(0.0, deadline - time.monotonic()))
    except asyncio.TimeoutError:
        raise DeadlineExceeded("request deadline passed while waiting for the upstream's embeddings") from None


def _timeout(limit: float, deadline: float | None) -> httpx.Timeout:
    """Per-request timeouts: the spec's read timeout, shortened to what the deadline leaves."""
    if deadline is not None:
        left = deadline - time.monotonic()
        if left <= 0:
            raise DeadlineExceeded("request deadline passed before reaching the upstream")
        limit = min(limit, left)
    return httpx.Timeout(limit, connect=min(CONNECT_TIMEOUT, limit))


def _reason(exc: BaseException) -> str:
    """A short why for ready_reason and messages (httpx's own texts are often vague or empty)."""
    if isinstance(exc, httpx.ConnectTimeout):
        return "connect timed out"
    cause: BaseException | None = exc
    for _ in range(8):   # the OS error (e.g. "connection refused") sits a few causes down
        if cause is None:
            break
        if isinstance(cause, OSError) and cause.errno:
            return os.strerror(cause.errno).lower()
        cause = cause.__cause__ or cause.__context__
    text = str(exc).strip()
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__
