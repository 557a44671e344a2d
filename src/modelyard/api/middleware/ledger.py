"""The request's ledger closed once its response has ended (quota/ledger)."""

from __future__ import annotations

from starlette.types import ASGIApp, Receive, Scope, Send


class CloseLedger:
    """Closes the request's ledger (quota/ledger, opened by api/auth.require_key: its key's
    in-flight slot goes back) once the ASGI call has returned: only then has the response ended,
    a streaming body included, whether it finished, failed, was cancelled because its client
    left, or its stream was closed. The one place that sees every way a request ends."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        state = scope.setdefault("state", {})      # before any inner copy of scope: one dict
        try:
            await self.app(scope, receive, send)
        finally:
            ledger = state.pop("ledger", None)
            if ledger is not None:
                ledger.close()
