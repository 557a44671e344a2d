"""A replica that drops the connection before answering (a killed engine; a keep-alive connection
the server had just closed): the client has seen nothing, so the pool sends the request again,
to the same replica on a fresh connection, then to the next one (issue 25: a killed replica
loses no request). Real sockets on loopback: a raw server that answers the health probe and drops
every POST after reading it, and a well-behaved one."""

from __future__ import annotations

import asyncio
import json

import pytest

from modelyard.errors import UpstreamError
from modelyard.engine.types import ChoiceDelta, EngineRequest
from modelyard.proxy.engine import ProxyEngine
from modelyard.proxy.replicas import ReplicaPool
from modelyard.settings import EndpointSpec

MODELS = json.dumps({"object": "list", "data": [{"id": "m", "object": "model"}]}).encode()
CHUNK = {"id": "x", "object": "text_completion", "created": 1, "model": "m",
         "choices": [{"index": 0, "text": "hello", "finish_reason": "stop", "logprobs": None}]}
USAGE = {**CHUNK, "choices": [], "usage": {"prompt_tokens": 3, "completion_tokens": 1, "total_tokens": 4}}
STREAM = b"data: %s\n\ndata: %s\n\ndata: [DONE]\n\n" % (json.dumps(CHUNK).encode(), json.dumps(USAGE).encode())


class RawServer:
    """HTTP/1.1 by hand: GET → the models list; POST → read whole, then closed unanswered
    (`drop`) or answered 200."""

    def __init__(self, drop: bool, headers_first: bool = False) -> None:
        # headers_first: a dropped POST gets its answer's headers first (an engine killed while
        # it prefilled a stream), then the close
        self.drop, self.headers_first, self.posts, self.server = drop, headers_first, 0, None

    async def start(self) -> str:
        self.server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        return f"http://127.0.0.1:{self.server.sockets[0].getsockname()[1]}/v1"

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                method = head.split(b" ", 1)[0]
                length = next((int(line.split(b":", 1)[1]) for line in head.split(b"\r\n")
                               if line.lower().startswith(b"content-length:")), 0)
                await reader.readexactly(length)
                if method == b"POST":
                    self.posts += 1
                    if self.drop:
                        if self.headers_first:
                            writer.write(b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\n"
                                         b"transfer-encoding: chunked\r\n\r\n")
                            await writer.drain()
                        return                      # closed below, nothing (more) answered
                body, kind = (MODELS, b"application/json") if method == b"GET" else (STREAM, b"text/event-stream")
                writer.write(b"HTTP/1.1 200 OK\r\ncontent-type: %s\r\ncontent-length: %d\r\n\r\n%s"
                             % (kind, len(body), body))
                await writer.drain()
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            writer.close()

    async def stop(self) -> None:
        self.server.close()
        await self.server.wait_closed()


@pytest.fixture
def anyio_backend():
    return "asyncio"


def pool_of(*urls: str) -> ReplicaPool:
    # probed once at start; no probe during the test, so only a request can change what it knows
    return ReplicaPool(EndpointSpec(name="ep", engine="openai", urls=urls, upstream_model="m", timeout=10),
                       health_interval=3600)


@pytest.mark.anyio
async def test_a_dropped_request_is_sent_again_and_answered_by_the_next_replica():
    dropping, good = RawServer(drop=True), RawServer(drop=False)
    urls = (await dropping.start(), await good.start())
    pool = pool_of(*urls)
    try:
        await pool.start()
        assert all(r.healthy for r in pool.replicas)            # both answer their probe
        answered = 0
        for _ in range(4):
            replica, resp = await pool.send("/completions", {"model": "m", "prompt": "x"}, None)
            assert resp.status_code == 200 and replica.url == urls[1]
            await resp.aclose()
            replica.in_flight -= 1
            answered += 1
        assert answered == 4
        # every request that went to the dropping replica first was tried there twice, then moved
        dropper = pool.replicas[0]
        assert dropping.posts == dropper.dropped and dropper.dropped % 2 == 0 and dropper.dropped > 0
        assert good.posts == 4 and dropper.healthy              # it still answers its probe
        assert pool.status()["replicas"][0]["dropped"] == dropper.dropped
    finally:
        await pool.stop()
        await dropping.stop()
        await good.stop()


@pytest.mark.anyio
async def test_when_every_replica_drops_the_request_it_is_a_502_not_a_hang():
    dropping = RawServer(drop=True)
    pool = pool_of(await dropping.start())
    try:
        await pool.start()
        with pytest.raises(UpstreamError) as err:
            await pool.send("/completions", {"model": "m", "prompt": "x"}, None)
        assert err.value.status == 502 and dropping.posts == 2       # once, and once more
    finally:
        await pool.stop()
        await dropping.stop()


@pytest.mark.anyio
async def test_an_answer_that_dies_before_its_first_event_is_sent_again():
    """The engine sent its stream's headers, then died (killed while it prefilled): no event
    reached anyone, so the request goes to the next replica and the client gets one whole answer."""
    dying, good = RawServer(drop=True, headers_first=True), RawServer(drop=False)
    urls = (await dying.start(), await good.start())
    engine = ProxyEngine(EndpointSpec(name="ep", engine="openai", urls=urls, upstream_model="m", timeout=10),
                         health_interval=3600)
    await engine.start()
    try:
        texts = []
        for i in range(4):
            out = [e async for e in engine.generate(EngineRequest(f"r{i}", "x", max_tokens=4))]
            texts.append("".join(e.text for e in out if isinstance(e, ChoiceDelta)))
        assert texts == ["hello"] * 4
        dead = engine.pool.replicas[0]
        assert dying.posts == dead.dropped > 0 and good.posts == 4
        assert all(r.in_flight == 0 for r in engine.pool.replicas)
    finally:
        await engine.stop()
        await dying.stop()
        await good.stop()
