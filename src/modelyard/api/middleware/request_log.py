"""Every API request counted and logged once it has fully ended (streams included)."""

from __future__ import annotations

import time

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from ..scope import BATCH_LINE, CONSOLE_CALLER
from .disconnect import CLIENT_GONE


class RequestLog:
    """Counts and logs every API request once it has fully ended (streams included), with the
    endpoint and token counts the route left in request.state. A batch's line (batch/runner, in
    process) is logged with its batch id and line number, so that an operator can tell offline
    work from interactive traffic in the log."""

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
            extra = state.get("log", {})
            if BATCH_LINE in scope:
                extra = {**extra, "batch_id": scope[BATCH_LINE]["batch_id"], "batch_line": scope[BATCH_LINE]["line"]}
            metrics.request(state.get("endpoint", "-"), scope["path"], status, time.monotonic() - started, extra)
