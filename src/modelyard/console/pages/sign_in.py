"""Signing in and out, and /console itself (to the Endpoints page).

An admin token is exchanged once for a session cookie (console/session): HttpOnly, SameSite=Strict,
Secure except over plain http to loopback, path /console. Sign-ins are throttled per client address
before the token is even compared, refused (503) while the control database is silent, and audited
taken or refused; signing out deletes the session's record, so every copy of the cookie ends at once.
"""

from __future__ import annotations

import asyncio
import ipaddress
import logging

from fastapi import APIRouter, Depends, Request
from fastapi.responses import RedirectResponse, Response

from ..forms import json_body
from ..guard import Refusal, leaver
from ..render import render
from ..session import COOKIE, SESSION_SECONDS, Session

log = logging.getLogger("modelyard.console")
router = APIRouter(prefix="/console", include_in_schema=False)


def _client(request: Request) -> str:
    return request.client.host if request.client else "unknown"


def _secure(request: Request) -> bool:
    """Secure cookies except over plain http to a loopback address (where no TLS is expected)."""
    if request.url.scheme == "https":
        return True
    host = (request.url.hostname or "").strip("[]")
    if host == "localhost" or host.endswith(".localhost"):
        return False
    try:
        return not ipaddress.ip_address(host).is_loopback
    except ValueError:
        return True


@router.get("")
@router.get("/")
async def home(request: Request) -> Response:
    return RedirectResponse("/console/endpoints", status_code=303)


@router.get("/login")
async def login_page(request: Request) -> Response:
    return render(request, "login.html", None)


@router.post("/login")
async def login(request: Request) -> Response:
    state, client = request.app.state.console, _client(request)
    wait = state.throttle.retry_after(client)
    if wait is not None:        # before the token is even compared: guessing is capped per address
        limit = request.app.state.settings.login_failures_per_minute
        raise Refusal(429, f"Too many failed sign-ins from {client}: login_failures_per_minute = {limit}. "
                      f"Try again in {max(1, round(wait))} s.", to_login=False, retry_after=max(1, round(wait)))
    sync = request.app.state.control_sync
    if sync.stale() is not None:
        raise Refusal(503, sync.refusal("console sign-ins"), to_login=False)
    token = (await json_body(request)).get("token")
    got = None
    if isinstance(token, str) and len(token) <= 4096:
        got = await asyncio.to_thread(state.sessions.login, token, client)
    else:
        await asyncio.to_thread(state.sessions.store.failed, {"client": client})
    if got is None:
        state.throttle.failed(client)
        log.warning("console: a failed sign-in from %s", client)
        raise Refusal(401, "That is not an admin token of this server.", to_login=False)
    log.info("console: %s signed in from %s", got[0].who, client)
    _, cookie = got
    response = Response(status_code=204, headers={"HX-Redirect": "/console/endpoints"})
    response.set_cookie(COOKIE, cookie, max_age=SESSION_SECONDS, path="/console", httponly=True,
                        samesite="strict", secure=_secure(request))
    return response


@router.post("/logout")
async def logout(request: Request, session: Session = Depends(leaver)) -> Response:
    # the record goes: this cookie, and any copy of it, is refused from now on in every process
    await asyncio.to_thread(request.app.state.console.sessions.logout, session, _client(request))
    response = Response(status_code=204, headers={"HX-Redirect": "/console/login"})
    response.delete_cookie(COOKIE, path="/console", httponly=True, samesite="strict", secure=_secure(request))
    return response
