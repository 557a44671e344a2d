"""Authorization: Bearer <key>: the configured keys and the control plane's stored ones, each
with its quota (quota/: in memory, or shared through Redis or PostgreSQL).

Keys may be configured in clear or as "sha256:<hex>" so that a config file holds no secrets.
Only digests are kept and compared (constant time, equal length); keys are never logged.

A configured key's id (usage rows, shown to viewers) is `config:` + 12 hex digits of an HMAC of
its digest under a secret the control database holds (`configured_id`): stable across restarts
and across the processes sharing that database, and of no use for testing guesses of the key.
(It was the start of the unsalted sha256 itself, which let a viewer test guesses of a weak key
offline; `name_configured` hands back those old ids so that their usage rows move to the new.)
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
import time
from typing import TYPE_CHECKING

from fastapi import Request

from ..errors import ControlStale, Forbidden, Unauthorized
from ..settings import KeySpec, secret_digest
from ..quota.limits import Slot
from ..quota.ledger import RequestLedger
from ..quota.memory import Quota
from .middleware.credentials import before_body

if TYPE_CHECKING:
    from ..registry.endpoint import Endpoint

def configured_id(secret: bytes, digest: bytes) -> str:
    """A configured key's id: 48 bits of HMAC-SHA256(secret, the key's sha256). Without the
    secret, which no response carries, it says nothing about the key."""
    return "config:" + hmac.new(secret, digest, hashlib.sha256).hexdigest()[:12]


class KeyChecker:
    """Configured keys (the TOML file, the environment) and, with the control plane, the keys of
    its store: `replace_stored` swaps those in (control/sync, every second), keeping the quota
    windows of keys that stay."""

    def __init__(self, keys: tuple[KeySpec, ...], control: bool = False, shared=None) -> None:
        # shared: quota/redis.RedisQuotas or quota/postgres.PostgresQuotas, seen by every process
        self._make = shared.quota if shared is not None else (lambda rpm, tpm, ident: Quota(rpm, tpm))
        self._keys = [(d, self._make(k.rpm, k.tpm, d)) for k in keys for d in (secret_digest(k.key),)]
        for k, (d, quota) in zip(keys, self._keys):
            quota.endpoints = frozenset(k.endpoints) if k.endpoints is not None else None
        # Without a control database ids are recorded nowhere: a key of this process will do.
        # With one, the app's lifespan calls name_configured with the database's before serving.
        self.name_configured(secrets.token_bytes(32))
        self._control = control
        # key id -> ((digest, valid until or None), ...), quota): a rotated key has two digests
        self._stored: dict[str, tuple[tuple[tuple[bytes, int | None], ...], Quota]] = {}
        self.book = None       # control/budget.BudgetBook (memory budgets), set by the app's lifespan
        self.sync = None       # control/sync.ControlSync: whether the stored keys may be trusted now

    def name_configured(self, secret: bytes) -> list[tuple[str, str]]:
        """Give each configured key its id under `secret`; (old id, new id) for every key,
        the old being what earlier versions called it (the start of its sha256)."""
        renamed = []
        for d, quota in self._keys:
            quota.key_id = configured_id(secret, d)
            renamed.append((f"config:{d.hex()[:12]}", quota.key_id))
        return renamed

    @property
    def enabled(self) -> bool:
        return bool(self._keys) or self._control

    def replace_stored(self, active) -> None:
        """`active`: control.keys.ActiveKey records (revoked keys are not among them)."""
        stored = {}
        for k in active:
            old = self._stored.get(k.id)
            quota = old[1] if old is not None else self._make(k.rpm, k.tpm, k.digest)
            quota.key_id = k.id
            quota.rpm, quota.tpm, quota.endpoints, quota.expires_at = k.rpm, k.tpm, k.endpoints, k.expires_at
            quota.max_parallel, quota.budget_tokens, quota.budget_period = k.max_parallel, k.budget_tokens, k.budget_period
            quota.book = self.book
            digests = ((k.digest, None),) + (((k.previous, k.previous_until),) if k.previous else ())
            stored[k.id] = (digests, quota)
        self._stored = stored      # one assignment: a request sees the old set or the new one
        if self.book is not None:  # the keys whose period totals it reads
            self.book.keys = {k.id: k.budget_period for k in active if k.budget_tokens and k.budget_period}

    def admit(self, authorization: str | None) -> tuple[Quota | None, Slot | None]:
        """The caller's quota (None when auth is off) and the in-flight slot its request holds
        until it has ended (the caller must release it), or Unauthorized / RateLimited."""
        if not self.enabled:
            return None, None
        scheme, _, token = (authorization or "").partition(" ")
        if scheme.lower() != "bearer" or not token.strip():
            raise Unauthorized("missing API key: send 'Authorization: Bearer <key>'", code="invalid_api_key")
        found, stored = self._find(token)
        if found is None:
            raise Unauthorized("invalid API key", code="invalid_api_key")
        if stored and self._stale():
            raise ControlStale(self.sync.refusal("stored API keys"), code="control_store_unavailable")
        if found.expires_at is not None and time.time() >= found.expires_at:
            raise Unauthorized("this API key has expired", code="expired_api_key")
        return found, found.admit(time.monotonic())

    def knows(self, authorization: str | None) -> bool:
        """Whether the header carries a valid key (no quota is counted: for open routes)."""
        scheme, _, token = (authorization or "").partition(" ")
        if not (self.enabled and scheme.lower() == "bearer" and token.strip()):
            return False
        found, stored = self._find(token)
        return found is not None and not (stored and self._stale())

    def _stale(self) -> bool:
        return self.sync is not None and self.sync.stale() is not None

    def _find(self, token: str) -> tuple[Quota | None, bool]:
        """The key's quota and whether it is a stored one (None, False: no such key)."""
        digest = hashlib.sha256(token.strip().encode()).digest()
        found, stored = None, False
        # no early exit: the time taken does not depend on which key matched
        for d, quota in self._keys:
            if hmac.compare_digest(d, digest):
                found = quota
        now = time.time()
        for digests, quota in self._stored.values():
            for d, until in digests:      # a rotated key's previous secret, until its grace ends
                if hmac.compare_digest(d, digest) and (until is None or now < until):
                    found, stored = quota, True
        return found, stored


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


@before_body
async def require_key(request: Request) -> None:
    """FastAPI dependency on every API route, run before the body is read (api/middleware/credentials): admission
    opens the request's ledger (quota/ledger) with the key's quota and in-flight slot; it is
    closed by api/middleware/ledger.CloseLedger once the response has ended, however it ended."""
    state = request.app.state
    quota, slot = state.keys.admit(request.headers.get("authorization"))
    request.state.quota = quota
    request.state.ledger = RequestLedger(quota, slot, getattr(state, "usage", None), state.metrics)


def may_see_reasons(request: Request) -> bool:
    """Whether this caller may be told why an endpoint is not ready (file paths, exception text,
    upstream hosts; secrets are redacted for everyone): a holder of a valid key, or anyone when
    the server has no keys and listens on loopback only (its callers are this machine's users,
    who can read its log). Everyone else gets states only."""
    keys = request.app.state.keys
    if keys.enabled:
        return keys.knows(request.headers.get("authorization"))
    return request.app.state.settings.loopback


def may_see_cache(request: Request) -> bool:
    """Whether this caller may read the prefix-cache counters (registry/render.CACHE_COUNTERS):
    they move when a prompt shares a prefix with one cached before, so whoever reads them can
    test a guess at another tenant's prompt. Admin tokens (`request.state.admin`, set by the
    route's dependency) may; everyone else only where `[server] public_cache_counters = true`
    (a server with one tenant)."""
    return request.app.state.settings.public_cache_counters or getattr(request.state, "admin", None) is not None
