"""ProxyEngine against stub upstreams (httpx.MockTransport) and, once, a real foreign HTTP server."""

from __future__ import annotations

import asyncio
import json
import socket
import threading
import time
from contextlib import asynccontextmanager

import httpx
import pytest

from modelyard.engine.types import (ChoiceDelta, EmbeddingRequest, EmbeddingResult, EngineRequest, FinishReason,
                                    ModelType, SamplingParams, TokenLogprobs, Usage)
from modelyard.errors import (DeadlineExceeded, EndpointNotReady, Upstream4xx, UpstreamError,
                              UpstreamTimeout)
from modelyard.proxy.engine import ProxyEngine
from modelyard.proxy.wire import prompt_bound
from modelyard.proxy.sse import SSEDecoder, SSEError, json_events
from modelyard.settings import EndpointSpec

A, B = "http://a:8001/v1", "http://b:8002/v1"
USAGE = {"id": "c", "object": "text_completion", "choices": [],
         "usage": {"prompt_tokens": 3, "completion_tokens": 2, "total_tokens": 5}}


@pytest.fixture
def anyio_backend():
    return "asyncio"


def chunk(text="", index=0, finish=None, logprobs=None):
    return {"id": "c", "object": "text_completion",
            "choices": [{"index": index, "text": text, "logprobs": logprobs, "finish_reason": finish}]}


def sse(*events, done=True) -> bytes:
    out = b"".join(b"data: " + json.dumps(e).encode() + b"\n\n" for e in events)
    return out + (b"data: [DONE]\n\n" if done else b"")


HELLO = sse(chunk("Hel"), chunk("lo", finish="stop"), USAGE)


class Upstream:
    """A stub of one or more replicas: /models answers per `up`, completions via `complete`."""

    def __init__(self, complete=None):
        self.complete = complete or (lambda request: httpx.Response(200, content=HELLO))
        self.up = {"a": True, "b": True}
        self.seen: list[httpx.Request] = []

    async def __call__(self, request: httpx.Request) -> httpx.Response:
        if request.url.path.endswith("/models"):
            if not self.up.get(request.url.host, True):
                raise httpx.ConnectError("connection refused")
            return httpx.Response(200, json={"object": "list", "data": []})
        if request.url.path == "/metrics":      # the probe's load read (proxy/load): none served here
            return httpx.Response(404)
        self.seen.append(request)
        return self.complete(request)

    def hosts(self) -> list[str]:
        return [r.url.host for r in self.seen]


def proxy_engine(upstream, urls=(A,), health_interval=3600.0, **spec) -> ProxyEngine:
    return ProxyEngine(EndpointSpec(name="routed", engine="openai", urls=tuple(urls), **spec),
                       httpx.MockTransport(upstream), health_interval=health_interval)


@asynccontextmanager
async def running(upstream, urls=(A,), health_interval=3600.0, **spec):
    engine = proxy_engine(upstream, urls, health_interval, **spec)
    await engine.start()
    try:
        yield engine
    finally:
        await engine.stop()


def req(prompt="Hi", **kw) -> EngineRequest:
    return EngineRequest(request_id="r1", prompt=prompt, **kw)


async def collect(engine, request=None) -> list:
    return [out async for out in engine.generate(request or req())]


# -- SSE parsing -----------------------------------------------------------------------

async def _lines(*lines):
    for line in lines:
        yield line


@pytest.mark.anyio
async def test_sse_comments_multiline_error_event_and_done():
    lines = [": keep-alive", "data: {\"a\":", "data: 1}", "",
             "event: error", "data: {\"message\": \"x\"}", "",
             "data: [DONE]", "", "data: {\"after\": 1}", ""]
    assert [e async for e in json_events(_lines(*lines))] == [{"a": 1}, {"error": {"message": "x"}}]
    # The last event counts even without its trailing blank line.
    assert [e async for e in json_events(_lines("data: {\"b\": 2}"))] == [{"b": 2}]
    with pytest.raises(SSEError):
        [e async for e in json_events(_lines("data: not json", ""))]
    assert SSEDecoder().feed("id: 7") is None


# -- requests --------------------------------------------------------------------------

@pytest.mark.anyio
async def test_body_renames_model_forces_stream_and_sends_auth():
    upstream = Upstream()
    sampling = SamplingParams(temperature=0.5, seed=7, logit_bias={42: -100.0}, logprobs=2)
    async with running(upstream, upstream_model="org/real-model", api_key="sk-up") as engine:
        await collect(engine, req(prompt=(1, 2, 3), sampling=sampling, n=1, max_tokens=5, stop=("\n",)))
    sent = upstream.seen[0]
    body = json.loads(sent.content)
    assert str(sent.url) == A + "/completions"
    assert sent.headers["authorization"] == "Bearer sk-up"
    assert body["model"] == "org/real-model" and body["prompt"] == [1, 2, 3]
    assert body["stream"] is True and body["stream_options"] == {"include_usage": True}
    assert body["logit_bias"] == {"42": -100.0} and body["seed"] == 7 and body["logprobs"] == 2
    assert body["stop"] == ["\n"] and body["max_tokens"] == 5 and body["temperature"] == 0.5


@pytest.mark.anyio
async def test_body_defaults_to_routing_name_and_omits_unset_fields():
    upstream = Upstream()
    async with running(upstream) as engine:
        await collect(engine)
    body = json.loads(upstream.seen[0].content)
    assert body["model"] == "routed" and body["prompt"] == "Hi"
    assert not {"stop", "seed", "logit_bias", "logprobs", "echo"} & set(body)
    assert "authorization" not in upstream.seen[0].headers


@pytest.mark.anyio
async def test_deltas_and_usage_are_re_yielded():
    lp = {"tokens": ["A", "B"], "token_logprobs": [-0.1, -0.2], "top_logprobs": [{"A": -0.1}, {"B": -0.2}],
          "text_offset": [2, 3]}
    body = sse(chunk("A", index=0), chunk("x", index=1), chunk("", index=0),   # empty: skipped
               chunk("B", index=0, finish="length", logprobs=lp), chunk("", index=1, finish="content_filter"),
               USAGE)
    async with running(Upstream(lambda r: httpx.Response(200, content=body))) as engine:
        out = await collect(engine, req(n=2))
    logprobs = TokenLogprobs(["A", "B"], [-0.1, -0.2], [{"A": -0.1}, {"B": -0.2}], [2, 3])
    assert out == [ChoiceDelta(0, "A"), ChoiceDelta(1, "x"),
                   ChoiceDelta(0, "B", logprobs, FinishReason.LENGTH),
                   ChoiceDelta(1, "", None, FinishReason.CONTENT_FILTER),
                   Usage(3, 2)]


@pytest.mark.anyio
@pytest.mark.parametrize("reason, ours", [
    ("stop", FinishReason.STOP), ("length", FinishReason.LENGTH),
    ("content_filter", FinishReason.CONTENT_FILTER), ("tool_calls", FinishReason.TOOL_CALLS),
    ("function_call", FinishReason.FUNCTION_CALL),
    ("eos_token", FinishReason.STOP), ("stop_sequence", FinishReason.STOP),     # TGI's names
])
async def test_finish_reasons_pass_through(reason, ours):
    body = sse(chunk("a", finish=reason), USAGE)
    async with running(Upstream(lambda r: httpx.Response(200, content=body))) as engine:
        out = await collect(engine)
    assert out[0] == ChoiceDelta(0, "a", None, ours) and ours.value in (reason, "stop")


@pytest.mark.anyio
@pytest.mark.parametrize("reason, why", [("abort", "aborted"), ("cancelled", "unknown finish_reason")])
async def test_abort_or_unknown_finish_reason_is_an_upstream_error(reason, why):
    """vLLM's "abort" is a choice the upstream dropped unfinished: not a stop."""
    body = sse(chunk("a"), chunk("", finish=reason), USAGE)
    got = []
    async with running(Upstream(lambda r: httpx.Response(200, content=body))) as engine:
        with pytest.raises(UpstreamError) as info:
            async for out in engine.generate(req()):
                got.append(out)
    assert got == [ChoiceDelta(0, "a")] and why in info.value.message and info.value.status == 502


@pytest.mark.anyio
async def test_missing_usage_falls_back_to_counting_chunks():
    body = sse(chunk("a"), chunk("b"), chunk("c", finish="stop"))
    async with running(Upstream(lambda r: httpx.Response(200, content=body))) as engine:
        out = await collect(engine)
    assert out[-1] == Usage(0, 3) and sum(isinstance(o, Usage) for o in out) == 1


@pytest.mark.anyio
async def test_balances_by_in_flight_then_round_robin():
    release = asyncio.Event()

    async def slow():
        yield b"data: " + json.dumps(chunk("x")).encode() + b"\n\n"
        await release.wait()
        yield sse(chunk("y", finish="stop"), USAGE)

    first = [True]

    def complete(request):
        if first[0]:
            first[0] = False
            return httpx.Response(200, content=slow())
        return httpx.Response(200, content=HELLO)

    upstream = Upstream(complete)
    async with running(upstream, urls=(A, B)) as engine:
        held = engine.generate(req())
        assert (await held.__anext__()).text == "x"
        assert engine.status()["in_flight"] == 1
        await collect(engine)                      # goes to the idle replica
        assert upstream.hosts()[1] != upstream.hosts()[0]
        release.set()
        assert [o async for o in held][-1] == Usage(3, 2)
        assert engine.status()["in_flight"] == 0
        await collect(engine)
        await collect(engine)                      # equal load: take turns
        assert sorted(upstream.hosts()[2:]) == ["a", "b"]


@pytest.mark.anyio
async def test_closing_early_releases_the_request():
    async def endless():
        for _ in range(1000):
            yield b"data: " + json.dumps(chunk("x")).encode() + b"\n\n"
            await asyncio.sleep(0)

    async with running(Upstream(lambda r: httpx.Response(200, content=endless()))) as engine:
        gen = engine.generate(req())
        await gen.__anext__()
        await gen.aclose()
        assert engine.status()["in_flight"] == 0


@pytest.mark.anyio
async def test_connect_error_retries_on_another_replica():
    def complete(request):
        if request.url.host == "a":
            raise httpx.ConnectError("connection refused")
        return httpx.Response(200, content=HELLO)

    upstream = Upstream(complete)
    async with running(upstream, urls=(A, B)) as engine:
        out = await collect(engine)
        assert upstream.hosts() == ["a", "b"] and out[-1] == Usage(3, 2)
        replicas = {r["url"]: r for r in engine.status()["replicas"]}
        assert not replicas[A]["healthy"] and "refused" in replicas[A]["last_error"]
        assert replicas[B]["healthy"] and engine.ready_reason() is None
        await collect(engine)                      # a stays out until a probe brings it back
        assert upstream.hosts()[-1] == "b"


@pytest.mark.anyio
async def test_all_replicas_down_is_not_ready_naming_them():
    def refuse(request):
        raise httpx.ConnectError("connection refused")

    async with running(Upstream(refuse), urls=(A, B)) as engine:
        with pytest.raises(EndpointNotReady) as info:
            await collect(engine)
        assert A in str(info.value) and B in str(info.value)
        assert engine.ready_reason() == str(info.value)


@pytest.mark.anyio
async def test_none_answering_at_start_is_not_ready_and_recovers_without_restart():
    upstream = Upstream()
    upstream.up = {"a": False, "b": False}
    async with running(upstream, urls=(A, B)) as engine:
        reason = engine.ready_reason()
        assert reason.startswith("no replica answers: ") and A in reason and B in reason
        with pytest.raises(EndpointNotReady):
            await collect(engine)
        assert upstream.seen == []                 # no replica was healthy: nothing was sent
        upstream.up["b"] = True
        await engine.probe_all()
        assert engine.ready_reason() is None
        assert (await collect(engine))[-1] == Usage(3, 2)
        upstream.up["b"] = False
        await engine.probe_all()
        assert engine.ready_reason() is not None


@pytest.mark.anyio
async def test_background_probe_brings_a_replica_back():
    upstream = Upstream()
    upstream.up["a"] = False
    async with running(upstream, health_interval=0.01) as engine:
        assert engine.ready_reason() is not None
        upstream.up["a"] = True
        for _ in range(200):                       # bounded: 2 s at most
            if engine.ready_reason() is None:
                break
            await asyncio.sleep(0.01)
        assert engine.ready_reason() is None


@pytest.mark.anyio
async def test_probe_non_2xx_is_unhealthy():
    async with running(lambda r: httpx.Response(503, json={"detail": "loading"})) as engine:
        assert engine.ready_reason() == f"no replica answers: {A}: HTTP 503"


@pytest.mark.anyio
@pytest.mark.parametrize("status, payload, message", [
    (400, {"error": {"message": "prompt too long", "type": "invalid_request_error"}}, "prompt too long"),
    (422, {"detail": "bad field"}, "bad field"),
    (413, {"error": "prompt is too large"}, "prompt is too large"),
])
async def test_upstream_4xx_passes_status_and_message(status, payload, message):
    async with running(Upstream(lambda r: httpx.Response(status, json=payload))) as engine:
        with pytest.raises(Upstream4xx) as info:
            await collect(engine)
    assert info.value.status == status and info.value.message == message


SECRET = "sk-upstream-0123456789abcdef"


@pytest.mark.anyio
@pytest.mark.parametrize("status, payload, said", [
    (401, {"error": {"message": f"Incorrect API key provided: {SECRET}.", "code": "invalid_api_key"}},
     "Incorrect API key provided"),
    (401, {"error": {"message": "Incorrect API key provided: sk-upst************cdef."}}, "Incorrect API key"),
    (403, {"error": "project has no access"}, "project has no access"),
    (404, {"error": {"message": "The model `org/nope` does not exist"}}, "does not exist"),
])
async def test_upstream_rejecting_our_config_is_502_saying_why_without_the_key(status, payload, said):
    """Our key or model name is wrong upstream: the client's own key and model were fine."""
    upstream = Upstream(lambda r: httpx.Response(status, json=payload))
    async with running(upstream, api_key=SECRET) as engine:
        with pytest.raises(UpstreamError) as info:
            await collect(engine)
    err = info.value
    assert type(err) is UpstreamError and err.status == 502 and err.code == "upstream_misconfigured"
    assert said in err.message and f"HTTP {status}" in err.message and A in err.message
    body = json.dumps(err.body())
    assert SECRET not in body and "cdef" not in body and "sk-upst" not in body


@pytest.mark.anyio
async def test_upstream_429_keeps_retry_after():
    upstream = Upstream(lambda r: httpx.Response(429, headers={"retry-after": "3"}, text="slow down"))
    async with running(upstream) as engine:
        with pytest.raises(Upstream4xx) as info:
            await collect(engine)
    assert (info.value.status, info.value.retry_after, info.value.message) == (429, 3.0, "slow down")


@pytest.mark.anyio
async def test_upstream_5xx_is_502_naming_replica():
    upstream = Upstream(lambda r: httpx.Response(500, json={"error": {"message": "CUDA OOM"}}))
    async with running(upstream) as engine:
        with pytest.raises(UpstreamError) as info:
            await collect(engine)
    assert type(info.value) is UpstreamError and info.value.status == 502
    assert A in info.value.message and "500" in info.value.message and "CUDA OOM" in info.value.message
    assert engine.status()["in_flight"] == 0


@pytest.mark.anyio
async def test_timeout_is_504():
    def slow(request):
        raise httpx.ReadTimeout("read timed out")

    async with running(Upstream(slow)) as engine:
        with pytest.raises(UpstreamTimeout) as info:
            await collect(engine)
    assert info.value.status == 504


@pytest.mark.anyio
async def test_passed_deadline_is_deadline_exceeded():
    async with running(Upstream()) as engine:
        with pytest.raises(DeadlineExceeded):
            await collect(engine, req(deadline=time.monotonic() - 1))


async def _broken():
    yield sse(chunk("Hel"), done=False)
    raise httpx.RemoteProtocolError("peer closed connection without sending complete message body")


@pytest.mark.anyio
@pytest.mark.parametrize("content, why", [
    (_broken, "RemoteProtocolError"),
    (lambda: sse(chunk("Hel"), {"error": {"message": "engine died"}}), "engine died"),
    (lambda: sse(chunk("Hel"), USAGE), "before choices [0] finished"),   # ended with no finish_reason
    (lambda: sse(chunk("Hel"), done=False) + b"data: {oops\n\n", "not JSON"),
    (lambda: sse(chunk("Hel"), {"choices": "nope"}), "malformed chunk"),
    (lambda: sse(chunk("Hel"), {"choices": [{"index": 0, "delta": None}]}), "malformed chunk"),
    (lambda: sse(chunk("Hel"), {"choices": [{"index": 0, "text": 7, "finish_reason": "stop"}]}),
     "malformed chunk"),
    (lambda: sse(chunk("Hel"), chunk("x", index=3, finish="stop")), "choice index 3"),
    (lambda: sse(chunk("Hel"), chunk("x", finish="stop", logprobs={"tokens": [1, 2]})), "malformed chunk"),
])
async def test_stream_broken_midway_raises_after_the_deltas_that_arrived(content, why):
    got = []
    async with running(Upstream(lambda r: httpx.Response(200, content=content()))) as engine:
        with pytest.raises(UpstreamError) as info:
            async for out in engine.generate(req()):
                got.append(out)
        assert engine.status()["in_flight"] == 0
    assert got == [ChoiceDelta(0, "Hel")]
    assert type(info.value) is UpstreamError and why in info.value.message


@pytest.mark.anyio
@pytest.mark.anyio
@pytest.mark.parametrize("first", [{"choices": [{"delta": {"content": ["a"]}, "index": 0}]},
                                   {"choices": [{"index": "zero", "text": "a"}]}, {"choices": [3]}])
async def test_malformed_first_chunk_raises_before_any_delta(first):
    """The API primes the first event: this is a 502 before any header, never a 500."""
    body = sse(first, chunk("a", finish="stop"), USAGE)
    async with running(Upstream(lambda r: httpx.Response(200, content=body))) as engine:
        stream = engine.generate(req())
        with pytest.raises(UpstreamError) as info:
            await stream.__anext__()
        assert engine.status()["in_flight"] == 0
    assert info.value.status == 502 and "malformed chunk" in info.value.message


@pytest.mark.anyio
async def test_an_error_event_mid_stream_does_not_echo_our_key():
    body = sse(chunk("a"), {"error": {"message": f"key {SECRET} revoked"}})
    async with running(Upstream(lambda r: httpx.Response(200, content=body)), api_key=SECRET) as engine:
        with pytest.raises(UpstreamError) as info:
            await collect(engine)
    assert "revoked" in info.value.message and SECRET not in info.value.message


@pytest.mark.anyio
@pytest.mark.parametrize("word", ["x" * 2_000_000, "sk-" + "y" * 2_000_000])
async def test_an_upstream_error_text_is_cut_before_any_pattern_runs(word):
    """The upstream chooses its error text: 2 MB of one word (the key-like pattern's `\\S*` runs
    were quadratic on it, hours on the event loop) is cut to 500 characters first; our key goes
    before the cut, so no part of it survives."""
    payload = {"error": {"message": f"{SECRET[:10]}{word}{SECRET}"}}
    async with running(Upstream(lambda r: httpx.Response(400, json=payload)), api_key=SECRET) as engine:
        with pytest.raises(Upstream4xx) as info:
            await collect(engine)
    assert len(info.value.message) <= 503 and SECRET not in info.value.message


@pytest.mark.anyio
async def test_malformed_usage_is_an_upstream_error():
    body = sse(chunk("x", finish="stop"), {"choices": [], "usage": {"prompt_tokens": "three"}})
    async with running(Upstream(lambda r: httpx.Response(200, content=body))) as engine:
        with pytest.raises(UpstreamError) as info:
            await collect(engine)
    assert "malformed usage" in info.value.message


@pytest.mark.anyio
async def test_chat_without_max_tokens_is_bounded_by_what_it_reserves():
    """The upstream is always told max_tokens, and the ledger entry reserves exactly the prompt's
    bound plus that, per choice: nothing the upstream generates was not reserved."""
    upstream = Upstream()
    messages = ({"role": "user", "content": "hi"},)
    reserved: list[int] = []

    class Entry:
        async def reserve(self, tokens):
            reserved.append(tokens)

        def settle(self, prompt, completion):
            pass
    async with running(upstream, context=512) as engine:
        await collect(engine, req(prompt="", messages=messages, ledger=Entry()))
        await collect(engine, req(prompt="", messages=messages, max_tokens=5))
    unset, five = (json.loads(r.content) for r in upstream.seen)
    bound = prompt_bound(req(prompt="", messages=messages))
    assert unset["max_tokens"] == 512 - bound and unset["messages"] == list(messages)
    assert reserved == [bound + unset["max_tokens"]]
    assert five["max_tokens"] == 5


@pytest.mark.anyio
async def test_generate_after_stop_is_not_ready():
    engine = proxy_engine(Upstream())
    await engine.start()
    await engine.stop()
    with pytest.raises(EndpointNotReady):
        await collect(engine)


# -- a real foreign server ---------------------------------------------------------------

def _tiny_upstream(cancelled: threading.Event):
    """A minimal OpenAI-style completions server: 'forever' streams until the client leaves."""
    from starlette.applications import Starlette
    from starlette.responses import JSONResponse, StreamingResponse
    from starlette.routing import Route

    async def models(request):
        return JSONResponse({"object": "list", "data": [{"id": "tiny", "object": "model"}]})

    async def completions(request):
        body = await request.json()

        async def events():
            if body["prompt"] == "forever":
                try:
                    for _ in range(400):           # bounded: ~20 s at most
                        yield "data: " + json.dumps(chunk("."), separators=(",", ":")) + "\n\n"
                        await asyncio.sleep(0.05)
                finally:
                    cancelled.set()
                return
            for piece in (chunk(body["model"] + ":"), chunk(" hi", finish="stop"), USAGE):
                yield "data: " + json.dumps(piece) + "\n\n"
            yield "data: [DONE]\n\n"

        return StreamingResponse(events(), media_type="text/event-stream")

    return Starlette(routes=[Route("/v1/models", models),
                             Route("/v1/completions", completions, methods=["POST"])])


@pytest.mark.anyio
async def test_real_upstream_completes_cancels_and_goes_unready_when_stopped():
    import uvicorn

    cancelled = threading.Event()
    server = uvicorn.Server(uvicorn.Config(_tiny_upstream(cancelled), log_level="warning", lifespan="off"))
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    url = f"http://127.0.0.1:{sock.getsockname()[1]}/v1"
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    engine = ProxyEngine(EndpointSpec(name="routed", engine="openai", urls=(url,), upstream_model="tiny"))
    try:
        for _ in range(100):
            if server.started:
                break
            await asyncio.sleep(0.05)
        await engine.start()
        assert engine.ready_reason() is None
        out = await collect(engine)
        assert "".join(o.text for o in out if isinstance(o, ChoiceDelta)) == "tiny: hi"
        assert out[-1] == Usage(3, 2)

        gen = engine.generate(req(prompt="forever"))
        await gen.__anext__()
        await gen.aclose()                         # the client left: the upstream must notice
        for _ in range(100):
            if cancelled.is_set():
                break
            await asyncio.sleep(0.05)
        assert cancelled.is_set()
    finally:
        server.should_exit = True
        await asyncio.to_thread(thread.join, 10)
        sock.close()
    assert not thread.is_alive()
    await engine.probe_all()
    reason = engine.ready_reason()
    await engine.stop()
    assert reason == f"no replica answers: {url}: connection refused"


# -- tool-call deltas from an upstream ----------------------------------------------------------

def test_tool_call_deltas_are_read_and_checked():
    from modelyard.proxy.wire import read_chunk
    from modelyard.proxy.sse import SSEError
    chunk = {"choices": [{"index": 0, "delta": {"tool_calls": [
        {"index": 0, "id": "call_1", "type": "function", "function": {"name": "f", "arguments": "{\"a\""}}]}}]}
    (delta,) = read_chunk(chunk, 1)
    assert delta.tool_calls == ({"index": 0, "id": "call_1", "function": {"name": "f", "arguments": "{\"a\""}},)
    bad = {"choices": [{"index": 0, "delta": {"tool_calls": [{"index": 0, "function": {"arguments": {"a": 1}}}]}}]}
    with pytest.raises(SSEError, match="arguments is dict, not a string"):
        read_chunk(bad, 1)


# -- embeddings ------------------------------------------------------------------------

def embeddings_answer(request: httpx.Request) -> httpx.Response:
    body = json.loads(request.content)
    data = [{"object": "embedding", "index": i, "embedding": [float(i), 0.5]} for i in range(len(body["input"]))]
    return httpx.Response(200, json={"object": "list", "data": data, "usage": {"prompt_tokens": 7}})


def embedding_req(*inputs, **kw) -> EmbeddingRequest:
    return EmbeddingRequest(request_id="e1", inputs=inputs or ("a",), **kw)


@pytest.mark.anyio
async def test_embed_posts_to_embeddings_and_reads_the_vectors():
    upstream = Upstream(embeddings_answer)
    async with running(upstream, upstream_model="org/embedder", api_key="sk-up", kind="embeddings") as engine:
        assert engine.model_type is ModelType.EMBEDDINGS and engine.model_engine == "OPENAI_PROXY"
        result = await engine.embed(embedding_req("a", "b"))
        assert engine.status()["in_flight"] == 0
    sent = upstream.seen[0]
    assert str(sent.url) == A + "/embeddings" and sent.headers["authorization"] == "Bearer sk-up"
    assert json.loads(sent.content) == {"model": "org/embedder", "input": ["a", "b"], "encoding_format": "base64"}
    assert result == EmbeddingResult(((0.0, 0.5), (1.0, 0.5)), 7)


@pytest.mark.anyio
async def test_embed_retries_a_connect_error_on_another_replica():
    def answer(request):
        if request.url.host == "a":
            raise httpx.ConnectError("connection refused")
        return embeddings_answer(request)

    upstream = Upstream(answer)
    async with running(upstream, urls=(A, B), kind="embeddings") as engine:
        assert (await engine.embed(embedding_req("x"))).vectors == ((0.0, 0.5),)
        assert upstream.hosts() == ["a", "b"]
        replicas = {r["url"]: r for r in engine.status()["replicas"]}
        assert not replicas[A]["healthy"] and replicas[B]["healthy"]
        assert engine.status()["in_flight"] == 0


@pytest.mark.anyio
async def test_embed_maps_upstream_errors_like_generate():
    statuses = iter([401, 400, 500])

    def answer(request):
        return httpx.Response(next(statuses), json={"error": {"message": "sk-up-secret is wrong"}})

    async with running(Upstream(answer), api_key="sk-up-secret", kind="embeddings") as engine:
        with pytest.raises(UpstreamError) as info:
            await engine.embed(embedding_req())
        assert info.value.code == "upstream_misconfigured" and "sk-up-secret" not in info.value.message
        with pytest.raises(Upstream4xx) as client_error:
            await engine.embed(embedding_req())
        assert client_error.value.status == 400
        with pytest.raises(UpstreamError) as server_error:
            await engine.embed(embedding_req())
        assert server_error.value.status == 502 and "answered 500" in server_error.value.message
        assert engine.status()["in_flight"] == 0


@pytest.mark.anyio
@pytest.mark.parametrize("answer, why", [
    ({"data": [{"embedding": [1.0]}]}, "1 vectors for 2 inputs"),
    ({"data": [{"index": 0, "embedding": [1.0]}, {"index": 0, "embedding": [1.0]}]}, "index 0 at position 1"),
    ({"data": [{"embedding": [1.0]}, {"embedding": "not base64!"}]}, "malformed"),
    ({"data": [{"embedding": [1.0]}, {"embedding": [True]}]}, "list of numbers"),
    ({"vectors": []}, "malformed"),
])
async def test_embed_rejects_malformed_answers(answer, why):
    async with running(Upstream(lambda r: httpx.Response(200, json=answer)), kind="embeddings") as engine:
        with pytest.raises(UpstreamError) as info:
            await engine.embed(embedding_req("a", "b"))
    assert info.value.status == 502 and why in info.value.message


@pytest.mark.anyio
async def test_embed_reads_base64_vectors():
    import base64
    import struct
    packed = base64.b64encode(struct.pack("<3f", 1.5, -2.0, 0.25)).decode()
    answer = {"data": [{"index": 0, "embedding": packed}], "usage": {"prompt_tokens": 2, "total_tokens": 2}}
    async with running(Upstream(lambda r: httpx.Response(200, json=answer)), kind="embeddings") as engine:
        assert await engine.embed(embedding_req("a", dimensions=3)) == EmbeddingResult(((1.5, -2.0, 0.25),), 2)
