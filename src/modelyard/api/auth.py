"""Authorization: Bearer <key> on the API's routes: `require_key` admits the request through the
key registry (quota/keys.KeyChecker: which key, its quota and in-flight slot), and what a caller
may see follows from its key (its endpoints, not-ready reasons, the prefix-cache counters)."""

from __future__ import annotations

from typing import TYPE_CHECKING

from fastapi import Request

from ..quota.ledger import RequestLedger
from .scope import BATCH_CALLER
from .middleware.credentials import before_body

if TYPE_CHECKING:
    from ..registry.endpoint import Endpoint


def visible_endpoints(request: Request) -> frozenset[str] | None:
    """The endpoints this caller may see and use: a key's `endpoints` list (stored or
    configured); None (every one) for admin tokens, unrestricted keys and keyless servers."""
    if getattr(request.state, "admin", None) is not None:
        return None
    quota = getattr(request.state, "quota", None)
    return quota.endpoints if quota is not None else None


def seen_endpoints(request: Request) -> list["Endpoint"]:
    """The endpoints this caller may know of: a key limited to some sees only those."""
    visible = visible_endpoints(request)
    return [ep for ep in request.app.state.registry.endpoints.values() if visible is None or ep.name in visible]


def find_endpoint(request: Request, name: str) -> "Endpoint":
    """The endpoint `name` as this caller may know it: a key limited to some endpoints gets the
    404 of an unknown name for every other one (a 403 would confirm that it exists), and the
    404 lists only its own endpoints (registry.get)."""
    return request.app.state.registry.get(name, visible_endpoints(request))


def credential(request: Request) -> str | None:
    """The request's `Authorization` header, or Anthropic's `x-api-key` as a bearer one (its
    official client sends the key that way): either header carries an inference key."""
    header = request.headers.get("authorization")
    if header is None and request.headers.get("x-api-key"):
        return "Bearer " + request.headers["x-api-key"]
    return header


@before_body
async def require_key(request: Request) -> None:
    """FastAPI dependency on every API route, run before the body is read (api/middleware/credentials): admission
    opens the request's ledger (quota/ledger) with the key's quota and in-flight slot; it is
    closed by api/middleware/ledger.CloseLedger once the response has ended, however it ended."""
    state = request.app.state
    batch = request.scope.get(BATCH_CALLER)     # a batch's line, run in process (batch/runner)
    if batch is not None:
        quota, slot = await state.keys.admit_id(batch)
    else:
        quota, slot = await state.keys.admit(credential(request))
    request.state.quota = quota
    request.state.ledger = RequestLedger(quota, slot, getattr(state, "usage", None), state.metrics,
                                         batch=batch is not None)


def is_batch(request: Request) -> bool:
    """Whether this request is a batch's line (batch/runner): its engine requests run at batch priority."""
    return request.scope.get(BATCH_CALLER) is not None


def may_see_reasons(request: Request) -> bool:
    """Whether this caller may be told why an endpoint is not ready (file paths, exception text,
    upstream hosts; secrets are redacted for everyone): a holder of a valid key, or anyone when
    the server has no keys and listens on loopback only (its callers are this machine's users,
    who can read its log). Everyone else gets states only."""
    keys = request.app.state.keys
    if keys.enabled:
        return keys.knows(credential(request))
    return request.app.state.settings.loopback


def may_see_cache(request: Request) -> bool:
    """Whether this caller may read the prefix-cache counters (registry/render.CACHE_COUNTERS):
    they move when a prompt shares a prefix with one cached before, so whoever reads them can
    test a guess at another tenant's prompt. Admin tokens (`request.state.admin`, set by the
    route's dependency) may; everyone else only where `[server] public_cache_counters = true`
    (a server with one tenant)."""
    return request.app.state.settings.public_cache_counters or getattr(request.state, "admin", None) is not None
