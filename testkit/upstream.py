"""The scripted OpenAI-compatible upstream the proxy tests put behind a real gateway, and the one
way to run an ASGI app (that upstream, or modelyard's own app) under uvicorn in a thread of the
test process on a loopback port.

A test scripts the upstream by what it is sent: the prompt of a completion, the last message of a
chat, the first input of an embeddings request. `answer(script, body, request)` returns the
Starlette response, so each test file keeps only its scripts (error bodies, finish reasons,
garbage, slow answers) and every request body is kept in `seen` for the test to inspect.

bench/stub_upstream.py is not this: it is a bare asyncio server that costs the benchmark as
little CPU as possible and counts TCP connections exactly, which an ASGI app under uvicorn
cannot promise (see its docstring).
"""

from __future__ import annotations

import asyncio
import inspect
import json
import socket
import threading
from contextlib import contextmanager
from typing import Any, AsyncIterable, Awaitable, Callable, Iterable, Iterator, Union

from testkit.until import until

Answer = Callable[[str, dict, Any], Union[Any, Awaitable[Any]]]     # (script, body, request) -> Response


def script_of(body: dict) -> str:
    """What picks the script: the prompt, the last chat message, or the first input (an input of
    token ids reads as "t" times their count)."""
    if "messages" in body:
        return body["messages"][-1]["content"]
    if "prompt" in body:
        return body["prompt"]
    first = body["input"][0] if isinstance(body["input"], list) else body["input"]
    return first if isinstance(first, str) else "t" * len(first)


def sse(parts: Iterable[dict | str] | AsyncIterable[dict | str]):
    """A server-sent-events response: a dict is one `data:` event, a str is written as it is (for
    [DONE] lines, or garbage). The loop is yielded to between parts, as a real server's would be."""
    from starlette.responses import StreamingResponse

    async def body():
        if hasattr(parts, "__aiter__"):
            async for part in parts:          # type: ignore[union-attr]
                yield part if isinstance(part, str) else f"data: {json.dumps(part)}\n\n"
        else:
            for part in parts:                # type: ignore[union-attr]
                yield part if isinstance(part, str) else f"data: {json.dumps(part)}\n\n"
                await asyncio.sleep(0)
    return StreamingResponse(body(), media_type="text/event-stream")


class Load:
    """An upstream's load as its engine would report it: GET /metrics serves these as vLLM's
    gauges (vllm:num_requests_running, vllm:num_requests_waiting); a test sets them."""

    def __init__(self) -> None:
        self.running = 0
        self.waiting = 0
        self.scrapes = 0

    def text(self) -> str:
        return ("# TYPE vllm:num_requests_running gauge\n"
                f'vllm:num_requests_running{{model_name="m"}} {self.running}\n'
                "# TYPE vllm:num_requests_waiting gauge\n"
                f'vllm:num_requests_waiting{{model_name="m"}} {self.waiting}\n')


def ok_answer(script: str, body: dict, request):
    """A short successful stream ("ok", then usage) in the shape of what was asked: chat or completion."""
    chat = "messages" in body
    choice = {"index": 0, "delta": {"content": "ok"}} if chat else {"index": 0, "text": "ok"}
    return sse([{"id": "up", "object": "chat.completion.chunk" if chat else "text_completion",
                 "choices": [{**choice, "logprobs": None, "finish_reason": "stop"}]},
                {"id": "up", "choices": [], "usage": {"prompt_tokens": 3, "completion_tokens": 1, "total_tokens": 4}},
                "data: [DONE]\n\n"])


def scripted_app(answer: Answer, seen: list[dict], model: str = "org/model", load: Load | None = None):
    """The upstream as a Starlette app: GET /v1/models lists `model`; POST /v1/completions,
    /v1/chat/completions and /v1/embeddings append the body to `seen` and return `answer`'s;
    with `load`, GET /metrics serves it (else 404, as servers without metrics answer)."""
    from starlette.applications import Starlette
    from starlette.responses import JSONResponse, PlainTextResponse, Response
    from starlette.routing import Route

    async def models(request):
        return JSONResponse({"object": "list", "data": [{"id": model, "object": "model"}]})

    async def metrics(request):
        if load is None:
            return Response(status_code=404)
        load.scrapes += 1
        return PlainTextResponse(load.text())

    async def generate(request):
        body = await request.json()
        seen.append(body)
        out = answer(script_of(body), body, request)
        return await out if inspect.isawaitable(out) else out

    async def other(request):
        """Any other POST (the routes modelyard passes through: /v1/rerank, /v1/audio/..., /classify):
        kept in `seen` as {"path", "content_type", "raw"} (and "json" when it is), answered by
        `answer("passthrough:" + path, ...)`."""
        raw = await request.body()
        kept: dict = {"path": request.url.path, "content_type": request.headers.get("content-type", ""), "raw": raw}
        try:
            kept["json"] = json.loads(raw)
        except ValueError:
            pass
        seen.append(kept)
        out = answer("passthrough:" + request.url.path, kept, request)
        return await out if inspect.isawaitable(out) else out

    return Starlette(routes=[Route("/v1/models", models), Route("/metrics", metrics)] + [
        Route(path, generate, methods=["POST"]) for path in ("/v1/completions", "/v1/chat/completions",
                                                             "/v1/embeddings")]
                     + [Route("/{path:path}", other, methods=["POST"])])


@contextmanager
def running(app, *, lifespan: str = "off", timeout: float = 60.0) -> Iterator[str]:
    """`app` under uvicorn in a daemon thread on a free loopback port, until the block ends; yields
    its base URL. lifespan="on" runs the app's startup and shutdown (modelyard's own app needs it)."""
    import uvicorn

    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning", access_log=False, lifespan=lifespan,
                                           timeout_graceful_shutdown=1))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, name="uvicorn", daemon=True)
    thread.start()
    try:
        until(lambda: server.started or not thread.is_alive(), timeout, "uvicorn started", interval=0.05)
        assert thread.is_alive(), "uvicorn exited while starting"
        yield f"http://127.0.0.1:{sock.getsockname()[1]}"
    finally:
        server.should_exit = True
        thread.join(30)
        sock.close()
        assert not thread.is_alive(), "uvicorn did not stop"


@contextmanager
def upstream(answer: Answer, model: str = "org/model", load: Load | None = None) -> Iterator[tuple[str, list[dict]]]:
    """The scripted upstream, running: (its OpenAI base URL, ".../v1"; the bodies it was sent).
    With `load`, its /metrics reports it."""
    seen: list[dict] = []
    with running(scripted_app(answer, seen, model, load)) as base:
        yield base + "/v1", seen
