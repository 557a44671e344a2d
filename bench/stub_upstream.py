"""An instant OpenAI-compatible upstream for gateway benchmarks (bench/proxy.py).

    python bench/stub_upstream.py [--host 127.0.0.1] [--port 8101] [--chunk-delay-ms 0]

Serves, with no model behind it:
  POST /v1/completions, /v1/chat/completions   non-streaming, or streaming: one chunk per piece
                                               of a fixed 5-token answer (the last carries
                                               finish_reason), a usage chunk when
                                               stream_options.include_usage, then [DONE]
  GET  /v1/models                              one model (any name is accepted on POST)
  GET  /stats                                  {"connections", "open", "requests", "paths"}:
                                               TCP connections accepted so far, open now, HTTP
                                               requests answered (the benchmark takes differences
                                               to tell whether a gateway pools connections)

It is a bare asyncio Protocol speaking HTTP/1.1 (keep-alive, Content-Length or chunked request
bodies, chunked streaming responses) rather than an ASGI app: the goal is an upstream that costs
as little CPU as possible on a 2-core machine, so the gateway in front of it is what gets
measured, and `connection_made` counts every accepted connection exactly. For that reason it is
not the tests' scripted upstream (testkit/upstream.py, a Starlette app under uvicorn in the test
process, scripted by prompt): merging them would put an ASGI stack's CPU into every figure this
stub is there to keep clean, and its scripts (errors, garbage, slow answers) the benchmark never
needs. `n` choices are
honoured (modelyard checks that every choice finishes). With --chunk-delay-ms, the stream
sleeps that long between chunks (0: all chunks are written at once).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import signal
import sys
import time
from collections import Counter

PIECES = ("Hello", " from", " the", " stub", ".")
ANSWER = "".join(PIECES)
PROMPT_TOKENS = 5
MAX_HEADER = 64 * 1024


class Stats:
    def __init__(self) -> None:
        self.connections = 0
        self.open = 0
        self.requests = 0
        self.paths: Counter[str] = Counter()

    def as_dict(self) -> dict:
        return {"connections": self.connections, "open": self.open, "requests": self.requests,
                "paths": dict(self.paths)}


def _dumps(obj: object) -> bytes:
    return json.dumps(obj, separators=(",", ":")).encode()


def _head(status: str, ctype: bytes, extra: bytes = b"") -> bytes:
    return b"HTTP/1.1 " + status.encode() + b"\r\ncontent-type: " + ctype + b"\r\n" + extra


def whole(status: str, body: bytes, close: bool = False) -> bytes:
    extra = b"content-length: " + str(len(body)).encode() + b"\r\n"
    if close:
        extra += b"connection: close\r\n"
    return _head(status, b"application/json", extra) + b"\r\n" + body


def chunk(data: bytes) -> bytes:
    return f"{len(data):x}\r\n".encode() + data + b"\r\n"


def completion_events(body: dict, chat: bool) -> list[bytes]:
    """The SSE events of one streamed answer, each already framed as an HTTP chunk."""
    model, n = body.get("model") or "stub", int(body.get("n") or 1)
    created = int(time.time())
    cid = ("chatcmpl-" if chat else "cmpl-") + "stub"
    obj = "chat.completion.chunk" if chat else "text_completion"
    usage_wanted = bool((body.get("stream_options") or {}).get("include_usage"))
    events: list[bytes] = []

    def emit(choices: list[dict], usage: object = None) -> None:
        payload = {"id": cid, "object": obj, "created": created, "model": model, "choices": choices}
        if usage_wanted:
            payload["usage"] = usage
        events.append(chunk(b"data: " + _dumps(payload) + b"\n\n"))

    if chat:
        emit([{"index": i, "delta": {"role": "assistant", "content": ""}, "logprobs": None,
               "finish_reason": None} for i in range(n)])
    for k, piece in enumerate(PIECES):
        last = k == len(PIECES) - 1
        finish = "stop" if last else None
        if chat:
            emit([{"index": i, "delta": {"content": piece}, "logprobs": None, "finish_reason": finish}
                  for i in range(n)])
        else:
            emit([{"text": piece, "index": i, "logprobs": None, "finish_reason": finish} for i in range(n)])
    if usage_wanted:
        emit([], {"prompt_tokens": PROMPT_TOKENS, "completion_tokens": len(PIECES) * n,
                  "total_tokens": PROMPT_TOKENS + len(PIECES) * n})
    events.append(chunk(b"data: [DONE]\n\n"))
    events.append(b"0\r\n\r\n")
    return events


def completion_body(body: dict, chat: bool) -> bytes:
    model, n = body.get("model") or "stub", int(body.get("n") or 1)
    usage = {"prompt_tokens": PROMPT_TOKENS, "completion_tokens": len(PIECES) * n,
             "total_tokens": PROMPT_TOKENS + len(PIECES) * n}
    if chat:
        choices = [{"index": i, "message": {"role": "assistant", "content": ANSWER}, "logprobs": None,
                    "finish_reason": "stop"} for i in range(n)]
        return _dumps({"id": "chatcmpl-stub", "object": "chat.completion", "created": int(time.time()),
                       "model": model, "choices": choices, "usage": usage})
    choices = [{"text": ANSWER, "index": i, "logprobs": None, "finish_reason": "stop"} for i in range(n)]
    return _dumps({"id": "cmpl-stub", "object": "text_completion", "created": int(time.time()),
                   "model": model, "choices": choices, "usage": usage})


class HTTP(asyncio.Protocol):
    """One connection: parse requests as they complete, answer in order (pipelining-safe)."""

    def __init__(self, stats: Stats, delay: float) -> None:
        self.stats, self.delay = stats, delay
        self.buf = bytearray()
        self.transport: asyncio.Transport | None = None
        self.busy = False          # a delayed stream is being written; later requests wait
        self.closing = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        self.stats.connections += 1
        self.stats.open += 1

    def connection_lost(self, exc: Exception | None) -> None:
        self.stats.open -= 1
        self.closing = True

    def data_received(self, data: bytes) -> None:
        self.buf += data
        self.process()

    def process(self) -> None:
        while not self.busy and not self.closing:
            req = self.parse()
            if req is None:
                return
            self.answer(*req)

    def parse(self) -> tuple[str, str, dict[bytes, bytes], bytes] | None:
        end = self.buf.find(b"\r\n\r\n")
        if end < 0:
            if len(self.buf) > MAX_HEADER:
                self.fail("431 Request Header Fields Too Large")
            return None
        lines = bytes(self.buf[:end]).split(b"\r\n")
        try:
            method, target, version = lines[0].decode("latin-1").split(" ", 2)
        except ValueError:
            self.fail("400 Bad Request")
            return None
        headers: dict[bytes, bytes] = {}
        for line in lines[1:]:
            name, _, value = line.partition(b":")
            headers[name.strip().lower()] = value.strip()
        start = end + 4
        if b"chunked" in headers.get(b"transfer-encoding", b"").lower():
            body = bytearray()
            pos = start
            while True:
                eol = self.buf.find(b"\r\n", pos)
                if eol < 0:
                    return None
                size = int(bytes(self.buf[pos:eol]).split(b";")[0], 16)
                if size == 0:
                    tail = self.buf.find(b"\r\n\r\n", eol)   # (no) trailers, then the blank line
                    if tail < 0:
                        return None
                    consumed = tail + 4
                    break
                if len(self.buf) < eol + 2 + size + 2:
                    return None
                body += self.buf[eol + 2:eol + 2 + size]
                pos = eol + 2 + size + 2
            del self.buf[:consumed]
            payload = bytes(body)
        else:
            length = int(headers.get(b"content-length", b"0") or 0)
            if len(self.buf) < start + length:
                return None
            payload = bytes(self.buf[start:start + length])
            del self.buf[:start + length]
        keep = version.upper() == "HTTP/1.1"
        conn = headers.get(b"connection", b"").lower()
        if b"close" in conn:
            keep = False
        elif b"keep-alive" in conn:
            keep = True
        if not keep:
            self.closing = True     # answer this one, then close
        return method.upper(), target.split("?", 1)[0], headers, payload

    def fail(self, status: str) -> None:
        assert self.transport is not None
        self.transport.write(whole(status, _dumps({"error": {"message": status, "type": "invalid_request_error"}}),
                                   close=True))
        self.transport.close()
        self.closing = True

    def answer(self, method: str, path: str, headers: dict[bytes, bytes], payload: bytes) -> None:
        assert self.transport is not None
        stats = self.stats
        stats.requests += 1
        stats.paths[f"{method} {path}"] += 1
        close = self.closing
        if path.endswith("/completions") and method == "POST":
            chat = path.endswith("/chat/completions")
            try:
                body = json.loads(payload or b"{}")
                if not isinstance(body, dict):
                    raise ValueError("not an object")
            except ValueError as exc:
                self.reply(whole("400 Bad Request", _dumps({"error": {"message": f"bad JSON: {exc}",
                                                                     "type": "invalid_request_error"}}), close))
                return
            if body.get("stream"):
                head = _head("200 OK", b"text/event-stream",
                             b"cache-control: no-cache\r\ntransfer-encoding: chunked\r\n"
                             + (b"connection: close\r\n" if close else b"")) + b"\r\n"
                events = completion_events(body, chat)
                if self.delay <= 0:
                    self.reply(head + b"".join(events), close)
                else:
                    self.busy = True
                    asyncio.get_running_loop().create_task(self.trickle(head, events, close))
                return
            self.reply(whole("200 OK", completion_body(body, chat), close), close)
        elif method == "GET" and path.endswith("/models"):
            self.reply(whole("200 OK", _dumps({"object": "list", "data": [
                {"id": "stub", "object": "model", "created": 0, "owned_by": "stub"}]}), close), close)
        elif method == "GET" and path == "/stats":
            self.reply(whole("200 OK", _dumps(stats.as_dict()), close), close)
        elif method == "GET" and path in ("/health", "/v1/health"):
            self.reply(whole("200 OK", b"{}", close), close)
        else:
            self.reply(whole("404 Not Found", _dumps({"error": {"message": f"no route {method} {path}",
                                                              "type": "invalid_request_error"}}), close), close)

    def reply(self, data: bytes, close: bool) -> None:
        assert self.transport is not None
        self.transport.write(data)
        if close:
            self.transport.close()

    async def trickle(self, head: bytes, events: list[bytes], close: bool) -> None:
        assert self.transport is not None
        try:
            self.transport.write(head + events[0])
            for ev in events[1:-2]:
                await asyncio.sleep(self.delay)
                if self.transport.is_closing():
                    return
                self.transport.write(ev)
            self.transport.write(events[-2] + events[-1])
            if close:
                self.transport.close()
        finally:
            self.busy = False
        self.process()


async def serve(host: str, port: int, delay: float) -> None:
    stats = Stats()
    loop = asyncio.get_running_loop()
    server = await loop.create_server(lambda: HTTP(stats, delay), host, port, reuse_address=True, backlog=4096)
    bound = server.sockets[0].getsockname()
    print(f"stub upstream listening on http://{bound[0]}:{bound[1]}/v1", flush=True)
    stop = asyncio.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    async with server:
        await stop.wait()
    print(f"stub upstream stopping: {json.dumps(stats.as_dict())}", file=sys.stderr, flush=True)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8101)
    p.add_argument("--chunk-delay-ms", type=float, default=0.0,
                   help="sleep between streamed chunks (default 0: the whole stream at once)")
    args = p.parse_args(argv)
    if args.host not in ("127.0.0.1", "localhost", "::1"):
        p.error("the stub serves on loopback only")
    asyncio.run(serve(args.host, args.port, args.chunk_delay_ms / 1000))
    return 0


if __name__ == "__main__":
    sys.exit(main())
