"""The web console at /console (on when the control plane is): `mount(app)`.

Pages are server-rendered Jinja templates (autoescaped); the browser runs only the vendored,
pinned htmx and its SSE and json-enc extensions (their sha256 checked here, at mount) and the
console's own static/console.js. Every console answer carries a Content-Security-Policy that
allows scripts from the console's own origin only (no inline script, no eval) and forbids
framing.
"""

from __future__ import annotations

import hashlib
import itertools
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path

from starlette.staticfiles import StaticFiles
from starlette.types import ASGIApp, Receive, Scope, Send

from ..errors import ConfigError

STATIC = Path(__file__).parent / "static"
VENDOR = STATIC / "vendor"

CSP = ("default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; connect-src 'self'; "
       "form-action 'self'; base-uri 'none'; frame-ancestors 'none'")
HEADERS = [(b"content-security-policy", CSP.encode()), (b"x-frame-options", b"DENY"),
           (b"x-content-type-options", b"nosniff"), (b"referrer-policy", b"same-origin"),
           (b"cache-control", b"no-store")]


def check_vendored() -> dict[str, str]:
    """Each vendored file against vendor/SHA256SUMS (the npm tarballs' files): ConfigError if a
    file was changed or is missing. Returns path -> digest."""
    sums = {}
    for line in (VENDOR / "SHA256SUMS").read_text().splitlines():
        digest, _, name = line.strip().partition("  ")
        if digest:
            sums[name] = digest
    for name, digest in sums.items():
        path = VENDOR / name
        actual = hashlib.sha256(path.read_bytes()).hexdigest() if path.is_file() else "missing"
        if actual != digest:
            raise ConfigError(f"console: vendored {name} is {actual}, not the pinned sha256 {digest}")
    return sums


class SecurityHeaders:
    """CSP, no framing, no caching (pages can hold a key's secret) on every /console answer."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or not (scope["path"] == "/console" or scope["path"].startswith("/console/")):
            return await self.app(scope, receive, send)

        async def with_headers(message) -> None:
            if message["type"] == "http.response.start":
                names = {k.lower() for k, _ in message.get("headers", [])}
                message["headers"] = list(message.get("headers", [])) + [
                    (k, v) for k, v in HEADERS if k not in names]
            await send(message)

        await self.app(scope, receive, with_headers)


@dataclass
class ConsoleState:
    sessions: object = None
    throttle: object = None
    sampler: object = None
    pulls: dict = field(default_factory=dict)
    pull_ids: itertools.count = field(default_factory=lambda: itertools.count(1))
    tasks: set = field(default_factory=set)


def mount(app) -> None:
    """Adds /console to an app whose control plane is on; its sampler starts and stops
    with the app's lifespan."""
    import asyncio

    from .guard import Refusal, refused
    from .pages import ROUTERS
    from .sampler import Sampler
    from ..control.sessions import SessionStore
    from .session import LoginThrottle, Sessions, current_tokens

    check_vendored()
    app.state.console = state = ConsoleState(sampler=Sampler(app))
    for router in ROUTERS:       # a page each (console/pages)
        app.include_router(router)
    app.add_exception_handler(Refusal, refused)     # every console refusal, answered one way (console/guard)
    app.mount("/console/static", StaticFiles(directory=STATIC), name="console-static")
    app.add_middleware(SecurityHeaders)
    inner = app.router.lifespan_context

    @asynccontextmanager
    async def lifespan(a):
        async with inner(a) as value:
            state.sessions = Sessions(SessionStore(a.state.key_store.db), lambda: current_tokens(a))
            state.throttle = LoginThrottle(a.state.settings.login_failures_per_minute)
            await state.sampler.start()
            try:
                yield value
            finally:
                await state.sampler.stop()
                for task in list(state.tasks):
                    task.cancel()
                await asyncio.gather(*state.tasks, return_exceptions=True)

    app.router.lifespan_context = lifespan
