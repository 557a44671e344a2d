"""The control plane's admin API under /api/v1/control (api keys and their audit log).

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
import time
import weakref
from typing import Annotated, Any, AsyncIterator, Callable, Literal

from fastapi import APIRouter, Depends, Header, Query, Request, Response
from fastapi.exceptions import RequestValidationError
from pydantic import BaseModel, ConfigDict, Field

from ..control.usage import USAGE_PAGE, USAGE_PAGE_MAX, query as usage_query
from ..errors import ControlStale, Forbidden, RateLimited, Unauthorized
from ..settings import AdminToken, secret_digest
from .gate import before_body
from .scope import CONSOLE_CALLER

router = APIRouter()


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
    that show an operator more (api/models: cache counters)."""
    if not request.app.state.settings.control_enabled:
        return None
    try:
        return caller(request)
    except (Unauthorized, Forbidden, ControlStale):
        return None


# Both run before the route's body is read (api/gate): a caller without a valid token, or a
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


class KeyFields(BaseModel):
    model_config = ConfigDict(extra="forbid")
    name: str | None = Field(None, min_length=1, max_length=100)
    rpm: int | None = Field(None, ge=1)
    tpm: int | None = Field(None, ge=1)
    endpoints: list[str] | None = None
    expires_at: int | None = Field(None, ge=0)
    max_parallel: int | None = Field(None, ge=1)      # requests in flight at once
    budget_tokens: int | None = Field(None, ge=1)     # tokens per budget_period (UTC calendar)
    budget_period: Literal["day", "month"] | None = None


class KeyCreate(KeyFields):
    name: str = Field(min_length=1, max_length=100)


def _check_budget(budget_tokens: int | None, budget_period: str | None) -> None:
    """A budget needs its period (the key's as it will be once changed)."""
    if budget_tokens is not None and budget_period is None:
        raise RequestValidationError([{"type": "value_error", "loc": ["body", "budget_period"], "input": None,
                                       "msg": f"budget_tokens = {budget_tokens} needs budget_period "
                                              "('day' or 'month', UTC calendar)"}])


def _check_fields(request: Request, body: KeyFields) -> None:
    known = request.app.state.registry.endpoints
    for i, name in enumerate(body.endpoints or ()):
        if name not in known:
            raise RequestValidationError([{"type": "value_error", "loc": ["body", "endpoints", i], "input": name,
                                           "msg": f"unknown model endpoint {name!r}; this server serves: "
                                                  f"{', '.join(sorted(known))}"}])
    if body.expires_at is not None and body.expires_at <= time.time():
        raise RequestValidationError([{"type": "value_error", "loc": ["body", "expires_at"], "input": body.expires_at,
                                       "msg": "expires_at must be in the future (unix seconds)"}])


def _etag(record: dict, response: Response) -> dict:
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


async def _write(request: Request, work, *args, **kwargs) -> Any:
    """A store call on a worker thread, then this process's keys refreshed at once."""
    result = await asyncio.to_thread(work, *args, **kwargs)
    await request.app.state.control_sync.refresh()
    return result


Limit = Annotated[int, Query(ge=1, le=100)]


@router.post("/api-keys", status_code=201, summary="Create an API key (its secret is in this answer only)")
async def create_key(body: KeyCreate, request: Request, response: Response,
                     who: AdminToken = Depends(admin)) -> dict:
    _check_fields(request, body)
    _check_budget(body.budget_tokens, body.budget_period)
    store = request.app.state.key_store
    record, secret = await _write(request, store.create, actor(who), name=body.name, rpm=body.rpm, tpm=body.tpm,
                                  endpoints=body.endpoints, expires_at=body.expires_at, max_parallel=body.max_parallel,
                                  budget_tokens=body.budget_tokens, budget_period=body.budget_period)
    return {**_etag(record, response), "secret": secret}


@router.get("/api-keys", summary="API keys, oldest first")
async def list_keys(request: Request, limit: Limit = 20, after: str | None = None,
                    _: AdminToken = Depends(viewer)) -> dict:
    return await asyncio.to_thread(request.app.state.key_store.list, limit, after)


@router.get("/api-keys/{key_id}", summary="One API key")
async def get_key(key_id: str, request: Request, response: Response, _: AdminToken = Depends(viewer)) -> dict:
    return _etag(await asyncio.to_thread(request.app.state.key_store.get, key_id), response)


@router.patch("/api-keys/{key_id}", summary="Change a key's name or limits (null resets a limit)")
async def patch_key(key_id: str, body: KeyFields, request: Request, response: Response,
                    if_match: Annotated[str | None, Header()] = None, who: AdminToken = Depends(admin)) -> dict:
    _check_fields(request, body)
    changes = {k: getattr(body, k) for k in body.model_fields_set}
    if changes.get("name", "") is None:
        raise RequestValidationError([{"type": "value_error", "loc": ["body", "name"], "input": None,
                                       "msg": "a key's name cannot be reset"}])
    if {"budget_tokens", "budget_period"} & set(changes):
        current = await asyncio.to_thread(request.app.state.key_store.get, key_id)
        merged = {**current, **changes}
        _check_budget(merged["budget_tokens"], merged["budget_period"])
    record = await _write(request, request.app.state.key_store.patch, actor(who), key_id, changes, revision_of(if_match))
    return _etag(record, response)


class Rotate(BaseModel):
    model_config = ConfigDict(extra="forbid")
    grace_seconds: int = Field(3600, ge=0, le=30 * 86400)   # how long the old secret keeps working


@router.post("/api-keys/{key_id}/rotate", summary="A new secret for a key; the old one works for grace_seconds")
async def rotate_key(key_id: str, request: Request, response: Response, body: Rotate | None = None,
                     who: AdminToken = Depends(admin)) -> dict:
    grace = (body or Rotate()).grace_seconds
    record, secret = await _write(request, request.app.state.key_store.rotate, actor(who), key_id, grace)
    return {**_etag(record, response), "secret": secret}


@router.post("/api-keys/{key_id}/revoke", summary="Revoke a key (final; every process refuses it within 2 s)")
async def revoke_key(key_id: str, request: Request, response: Response, who: AdminToken = Depends(admin)) -> dict:
    return _etag(await _write(request, request.app.state.key_store.revoke, actor(who), key_id), response)


@router.get("/audit-log", summary="Every admin action: who, what, when (ids, never secrets)")
async def audit_log(request: Request, limit: Limit = 20, after: str | None = None,
                    _: AdminToken = Depends(viewer)) -> dict:
    return await asyncio.to_thread(request.app.state.key_store.audit, limit, after)


@router.get("/usage", summary="Requests and tokens per key and endpoint, by minute, hour or day")
async def usage(request: Request, granularity: Annotated[str, Query(pattern="^(minute|hour|day)$")] = "hour",
                key_id: str | None = None, endpoint: str | None = None,
                start: Annotated[int | None, Query(ge=0)] = None, end: Annotated[int | None, Query(ge=0)] = None,
                limit: Annotated[int, Query(ge=1, le=USAGE_PAGE_MAX)] = USAGE_PAGE,
                after: Annotated[str | None, Query(max_length=1000)] = None,
                _: AdminToken = Depends(viewer)) -> dict:
    """Paged like the other lists (`limit`, `after` = the last page's `last_id`): one answer was
    every row ever stored for a viewer's `start=0`."""
    return await asyncio.to_thread(usage_query, request.app.state.key_store.db, granularity, key_id, endpoint, start, end,
                                   limit, after)
