"""Who may call the admin API under /api/v1/control, and the conventions its rooms share.

Platform conventions: objects with `id`, `object`, unix `created_at`/`updated_at`; lists paged by
`limit` + `after` returning {"object": "list", "data", "has_more", "last_id"}; PATCH where null
resets a field; 422 in FastAPI's shape; 409 for conflicts; `ETag` on reads and `If-Match` on
writes (412 when stale).

Admin tokens (`[[admin_tokens]]`, MODELYARD_ADMIN_TOKEN, or stored by `modelyard admin create-token`) call it: role `admin` changes, `viewer`
reads. An inference key is refused (403), and an admin token is no inference key.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import weakref
from typing import Annotated, Any, AsyncIterator, Callable

from fastapi import Query, Request, Response
from fastapi.exceptions import RequestValidationError

from ...errors import ControlStale, Forbidden, RateLimited, Unauthorized
from ...settings import AdminToken, secret_digest
from ..middleware.credentials import before_body
from ..scope import CONSOLE_CALLER



def caller(request: Request) -> AdminToken:
    """The admin token in the Authorization header, or 401/403."""
    inside = request.scope.get(CONSOLE_CALLER)
    if isinstance(inside, AdminToken):
        return inside
    scheme, _, token = (request.headers.get("authorization") or "").partition(" ")
    if scheme.lower() != "bearer" or not token.strip():
        raise Unauthorized("missing admin token: send 'Authorization: Bearer <admin token>'", code="invalid_admin_token")
    digest = hashlib.sha256(token.strip().encode()).digest()
    found, from_store = None, False
    stored = getattr(request.app.state, "admin_tokens", None)     # control/admin_tokens.StoredAdmins
    configured = request.app.state.settings.admin_tokens
    for i, admin in enumerate((*configured, *(stored.tokens if stored else ()))):  # no early exit
        if hmac.compare_digest(secret_digest(admin.token), digest):
            found, from_store = admin, i >= len(configured)
    if from_store:
        refuse_if_stale(request, "stored admin tokens")
    if found is None:
        if request.app.state.keys.knows(request.headers.get("authorization")):
            raise Forbidden("an inference API key cannot call the control plane; use an admin token",
                            code="not_an_admin_token")
        raise Unauthorized("invalid admin token", code="invalid_admin_token")
    return found


def refuse_if_stale(request: Request, what: str) -> None:
    """503 when the control database has been silent past the bound (control/sync: a revocation
    made meanwhile could not have been seen here)."""
    sync = getattr(request.app.state, "control_sync", None)
    if sync is not None and sync.stale() is not None:
        raise ControlStale(sync.refusal(what), code="control_store_unavailable")


def admin_or_none(request: Request) -> AdminToken | None:
    """The admin token (either role) this request carries, or None: for routes open to others
    that show an operator more (api/probes: cache counters)."""
    if not request.app.state.settings.control_enabled:
        return None
    try:
        return caller(request)
    except (Unauthorized, Forbidden, ControlStale):
        return None


# Both run before the route's body is read (api/middleware/credentials): a caller without a valid token, or a
# viewer sending a change, costs its headers and nothing more.
@before_body
def viewer(request: Request) -> AdminToken:
    return caller(request)


@before_body
def admin(request: Request) -> AdminToken:
    who = caller(request)
    if who.role != "admin":
        raise Forbidden(f"admin token {who.name!r} is a viewer: it may read, not change", code="read_only_token")
    return who


def actor(who: AdminToken) -> str:
    return f"{who.role}:{who.name}"


class StreamSlots:
    """Server-sent-event streams open at once per admin token in this process (the admin API's
    and the console's together): `max_streams_per_token`, then 429. A stream holds a task and a
    registry listener for as long as its client stays, so an unbounded number is a way to hold
    a server's memory with one token."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.open: dict[bytes, int] = {}

    def take(self, who: AdminToken) -> Callable[[], None]:
        """A slot for one stream of `who` (429 past the limit); returns its release, which may be
        called more than once (the stream's end, and the finalizer of a stream never started)."""
        key = secret_digest(who.token)
        if self.open.get(key, 0) >= self.limit:
            raise RateLimited(f"admin token {who.name!r} has {self.open[key]} event streams open: "
                              f"max_streams_per_token = {self.limit}; close one first",
                              code="too_many_streams", retry_after=5)
        self.open[key] = self.open.get(key, 0) + 1
        released = False

        def release() -> None:
            nonlocal released
            if not released:
                released = True
                left = self.open.get(key, 0) - 1
                if left > 0:
                    self.open[key] = left
                else:
                    self.open.pop(key, None)
        return release

    def stream(self, who: AdminToken, body: AsyncIterator[str]) -> AsyncIterator[str]:
        """`body` holding a slot of `who` until it ends. A client gone before the first chunk
        leaves a generator that never started, whose `finally` never runs: its slot is
        released when the generator is collected."""
        release = self.take(who)

        async def held() -> AsyncIterator[str]:
            try:
                async for chunk in body:
                    yield chunk
            finally:
                release()
        gen = held()
        weakref.finalize(gen, release)
        return gen


def still_valid(app, who: AdminToken):
    """A check that `who` is still accepted (not revoked, not refused for a silent control
    database): long-lived answers, the event streams, end when it fails."""
    def alive() -> bool:
        configured = app.state.settings.admin_tokens
        if who in configured:
            return True
        sync = getattr(app.state, "control_sync", None)
        stored = getattr(app.state, "admin_tokens", None)
        return not (sync is not None and sync.stale() is not None) and who in (stored.tokens if stored else ())
    return alive


Limit = Annotated[int, Query(ge=1, le=100)]


def with_etag(record: dict, response: Response) -> dict:
    response.headers["ETag"] = f'"{record["revision"]}"'
    return record


def revision_of(value: str | None) -> int | None:
    if value is None:
        return None
    raw = value.strip().removeprefix("W/").strip('"')
    if not raw.isascii() or not raw.isdigit():
        raise RequestValidationError([{"type": "value_error", "loc": ["header", "if-match"], "input": value,
                                       "msg": "If-Match must be an ETag this API sent, such as \"3\""}])
    return int(raw)


async def write_through(request: Request, work, *args, **kwargs) -> Any:
    """A store call on a worker thread, then this process's keys refreshed at once."""
    result = await asyncio.to_thread(work, *args, **kwargs)
    await request.app.state.control_sync.refresh()
    return result
