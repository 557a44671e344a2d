"""Every API request counted and logged once it has fully ended (streams included)."""

from __future__ import annotations

import time

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from ..scope import CONSOLE_CALLER
from .disconnect import CLIENT_GONE


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
