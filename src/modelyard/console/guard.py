"""Who may do what in the console, said once: FastAPI dependencies and the one way a refusal is answered.

A handler names what it needs, `session: Session = Depends(reader)` (or `changer`, or `leaver`),
the way Starlette's `requires` names scopes: the dependency checks and returns the session, or
raises `Refusal`, and `refused` (the exception handler `mount()` installs) answers it. So every
refusal of the console, the guards' and the handlers' own (throttled sign-ins, a full stream
quota, an unknown action), has one shape: the `_refusal.html` fragment, with HX-Redirect to the
sign-in page when htmx got a 401 that signing in again would cure, Retry-After where it is known.

The guard runs before the handler, so a change's session, CSRF token and role are checked before
its body is read: a refused request is never parsed.
"""

from __future__ import annotations

import asyncio

from fastapi import Request
from fastapi.responses import HTMLResponse, RedirectResponse, Response

from ..errors import Unauthorized
from ..settings import AdminToken
from .render import env
from .session import COOKIE, CSRF_HEADER, Session

LOGIN = "/console/login"
SIGNED_OUT = "Not signed in (or the session expired): sign in again."
BAD_CSRF = "Refused: the CSRF token is missing or wrong. Reload the page."


class Refusal(Exception):
    """A console request refused: `status` and `message` for the refusal fragment. `to_login`:
    a 401 that sends htmx to the sign-in page; `redirect`: a page's 303 instead of a fragment;
    `retry_after`: seconds, sent as Retry-After."""

    def __init__(self, status: int, message: str = "", to_login: bool = True, redirect: str | None = None,
                 retry_after: int | None = None) -> None:
        super().__init__(status, message)
        self.status, self.message, self.to_login = status, message, to_login
        self.redirect, self.retry_after = redirect, retry_after


def htmx(request: Request) -> bool:
    return request.headers.get("hx-request") == "true"


async def refused(request: Request, exc: Refusal) -> Response:
    """The exception handler of `Refusal` (installed by console.mount)."""
    if exc.redirect:
        return RedirectResponse(exc.redirect, status_code=303)
    headers = {"HX-Redirect": LOGIN} if exc.status == 401 and exc.to_login and htmx(request) else {}
    if exc.retry_after is not None:
        headers["Retry-After"] = str(exc.retry_after)
    return HTMLResponse(env.get_template("_refusal.html").render(message=exc.message), status_code=exc.status,
                        headers=headers)


async def current(request: Request) -> Session | None:
    """The request's live session (a database read, on a worker thread) or None; a 503 refusal
    while the control database has been silent past its bound: sessions are records there, and a
    revocation could have been missed (control/sync)."""
    sync = request.app.state.control_sync
    if sync.stale() is not None:
        raise Refusal(503, sync.refusal("console sessions"), to_login=False)
    return await asyncio.to_thread(request.app.state.console.sessions.read, request.cookies.get(COOKIE))


async def still_signed_in(request: Request) -> bool:
    """For a long answer (the SSE table) to ask again: False once the session ended or the
    control database went silent."""
    try:
        return await current(request) is not None
    except Refusal:
        return False


async def reader(request: Request) -> Session:
    """Any signed-in session. Signed out: a page is redirected to sign-in; a fragment, the CSV or
    the stream (whose caller cannot follow a redirect to a page) gets a 401."""
    session = await current(request)
    if session is None:
        if htmx(request) or request.url.path.endswith((".csv", "/stream")):
            raise Refusal(401, SIGNED_OUT)
        raise Refusal(303, redirect=LOGIN)
    return session


def _csrf_checked(request: Request, session: Session | None, signed_out: str) -> Session:
    if session is None:
        raise Refusal(401, signed_out)
    if not request.app.state.console.sessions.csrf_ok(session, request.headers.get(CSRF_HEADER)):
        raise Refusal(403, BAD_CSRF)
    return session


async def changer(request: Request) -> Session:
    """A state-changing request: a session, its CSRF token, the admin role; else 401/403."""
    session = _csrf_checked(request, await current(request), SIGNED_OUT)
    if not session.admin:
        raise Refusal(403, f"Refused: {session.name!r} is a viewer token; it can look, not change.")
    return session


async def leaver(request: Request) -> Session:
    """Signing out: a session and its CSRF token, any role (a viewer may sign out)."""
    return _csrf_checked(request, await current(request), "Not signed in.")


def one_of(what: str, *actions: str):
    """A dependency for a path's `{action}`, listed before the guard: an unknown action is a 404
    whoever asks, before the session is read."""
    def action(action: str) -> str:
        if action not in actions:
            raise Refusal(404, f"no {what} action {action!r} ({', '.join(actions)})")
        return action
    return action


def who(request: Request, session: Session) -> AdminToken:
    """The admin token a session acts as (the console's in-process API calls run as it)."""
    token = request.app.state.console.sessions.token_of(session)
    if token is None:         # Sessions.read found it a moment ago; removed since
        raise Unauthorized("the admin token of this session is gone; sign in again", code="invalid_admin_token")
    return token
