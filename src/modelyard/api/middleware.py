"""ASGI middleware: body-size limit (413) and JSON bodies whatever their Content-Type."""

from __future__ import annotations

import json
import time

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from .control import CONSOLE_CALLER
from .disconnect import CLIENT_GONE


class BodyLimits:
    """Rejects bodies above `max_bytes` with 413 before reading them into memory, and treats
    every POST body as JSON: `curl -d` sends form-urlencoded, and OpenAI's API accepts it too.
    (A browser's POST must say application/json: api/origin.BrowserGuard refuses it before.)"""

    def __init__(self, app: ASGIApp, max_bytes: int) -> None:
        self.app = app
        self.max_bytes = max_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["method"] != "POST":
            return await self.app(scope, receive, send)
        headers = [(k, v) for k, v in scope["headers"] if k != b"content-type"]
        headers.append((b"content-type", b"application/json"))
        scope = {**scope, "headers": headers}
        length = dict(scope["headers"]).get(b"content-length")
        if length is not None and length.isdigit() and int(length) > self.max_bytes:
            return await self._too_large(send, int(length))
        seen = 0
        too_large: int | None = None

        async def limited() -> Message:
            nonlocal seen, too_large
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > self.max_bytes:
                    too_large = seen
                    raise _TooLarge(seen)
            return message

        async def guarded(message: Message) -> None:
            # FastAPI turns any exception raised while it reads the body into its own 400
            # ("There was an error parsing the body"): once the limit is hit, that answer is
            # dropped and the 413 below goes out instead.
            if too_large is None:
                await send(message)

        try:
            await self.app(scope, limited, guarded)
        except _TooLarge:
            pass
        if too_large is not None:
            await self._too_large(send, too_large)

    async def _too_large(self, send: Send, size: int) -> None:
        body = json.dumps({"error": {
            "message": f"request body is {size} bytes, above this server's limit of {self.max_bytes} bytes",
            "type": "invalid_request_error", "param": None, "code": "request_too_large"}}).encode()
        await send({"type": "http.response.start", "status": 413,
                    "headers": [(b"content-type", b"application/json"),
                                (b"content-length", str(len(body)).encode())]})
        await send({"type": "http.response.body", "body": body})


class _TooLarge(Exception):
    pass


class ReleaseSlot:
    """Gives back the in-flight slot api/auth.require_key took for the request (a key's
    `max_parallel`), and ends its CutShort watch (api/pipeline), once the ASGI call has returned: only then has the response ended, a streaming
    body included, whether it finished, failed, was cancelled because its client left, or its
    stream was closed. The one place that sees every way a request ends."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        state = scope.setdefault("state", {})      # before any inner copy of scope: one dict
        try:
            await self.app(scope, receive, send)
        finally:
            slot = state.pop("slot", None)
            if slot is not None:
                slot.release()
            cut = state.pop("cut_short", None)      # api/pipeline.CutShort: usage of a request cut short
            if cut is not None:
                cut.end()


class RequestLog:
    """Counts and logs every API request once it has fully ended (streams included), with the
    endpoint and token counts the route left in request.state."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        # The console's in-process admin calls (console/internal) are not API traffic: its open
        # pages poll every second; the admin actions among them are in the audit log.
        if scope["type"] != "http" or not scope["path"].startswith(("/api/", "/v1/")) or CONSOLE_CALLER in scope:
            return await self.app(scope, receive, send)
        started = time.monotonic()
        status = 500
        state = scope.setdefault("state", {})

        async def watch(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, watch)
        finally:
            if state.get("client_gone") and status == 500:    # left before any answer
                status = CLIENT_GONE
            metrics = scope["app"].state.metrics
            metrics.request(state.get("endpoint", "-"), scope["path"], status, time.monotonic() - started,
                            state.get("log", {}))
