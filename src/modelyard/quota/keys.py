"""Which key a request carries, and its quota: the configured keys (the TOML file, the environment)
and the control plane's stored ones, each with a quota/policy.KeyQuota from the backend in force
(quota/memory, quota/redis or quota/postgres).

Keys may be configured in clear or as "sha256:<hex>" so that a config file holds no secrets.
Only digests are kept and compared (constant time, equal length); keys are never logged.

A key's quota is named in a shared store (Redis, PostgreSQL) by its stable identity, never by a
secret: a stored key by its id, which a rotation keeps (so its windows and its budget counter stay
one across rotations and across gateways started before or after one); a configured key by its
sha256, which is stable because a configured key cannot rotate (a new secret in the file is a new
key), and which every process knows at start, with or without the control database (its
`configured_id` needs the database's secret). The store sees only a digest of that identity.

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

from ..errors import ControlStale, Unauthorized
from ..settings import KeySpec, secret_digest
from .limits import Slot
from .memory import MemoryQuotas
from .policy import Backend, KeyQuota


def configured_id(secret: bytes, digest: bytes) -> str:
    """A configured key's id: 48 bits of HMAC-SHA256(secret, the key's sha256). Without the
    secret, which no response carries, it says nothing about the key."""
    return "config:" + hmac.new(secret, digest, hashlib.sha256).hexdigest()[:12]


class KeyChecker:
    """Configured keys (the TOML file, the environment) and, with the control plane, the keys of
    its store: `replace_stored` swaps those in (control/sync, every second), keeping the quota
    windows of keys that stay."""

    def __init__(self, keys: tuple[KeySpec, ...], control: bool = False, shared: Backend | None = None) -> None:
        # shared: quota/redis.RedisQuotas or quota/postgres.PostgresQuotas, seen by every process
        self.backend = shared if shared is not None else MemoryQuotas()
        self._keys = [(d, self.backend.quota(k.rpm, k.tpm, d)) for k in keys for d in (secret_digest(k.key),)]
        for k, (d, quota) in zip(keys, self._keys):
            quota.endpoints = frozenset(k.endpoints) if k.endpoints is not None else None
        # Without a control database ids are recorded nowhere: a key of this process will do.
        # With one, the app's lifespan calls name_configured with the database's before serving.
        self.name_configured(secrets.token_bytes(32))
        self._control = control
        # key id -> ((digest, valid until or None), ...), quota): a rotated key has two digests
        self._stored: dict[str, tuple[tuple[tuple[bytes, int | None], ...], KeyQuota]] = {}
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
            quota = old[1] if old is not None else self.backend.quota(k.rpm, k.tpm, b"stored:" + k.id.encode())
            quota.key_id = k.id
            quota.rpm, quota.tpm, quota.endpoints, quota.expires_at = k.rpm, k.tpm, k.endpoints, k.expires_at
            quota.max_parallel, quota.budget_tokens, quota.budget_period = k.max_parallel, k.budget_tokens, k.budget_period
            quota.book = self.book
            digests = ((k.digest, None),) + (((k.previous, k.previous_until),) if k.previous else ())
            stored[k.id] = (digests, quota)
        self._stored = stored      # one assignment: a request sees the old set or the new one
        if self.book is not None:  # the keys whose period totals it reads
            self.book.keys = {k.id: k.budget_period for k in active if k.budget_tokens and k.budget_period}

    async def admit(self, authorization: str | None) -> tuple[KeyQuota | None, Slot | None]:
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
        return found, await found.admit()

    async def admit_id(self, key_id: str) -> tuple[KeyQuota | None, Slot | None]:
        """`admit` for a batch's line (batch/runner), by the id of the key that created the batch
        (no secret is kept for it): the key must still be valid (revoked, expired: 401), and the
        line counts against its quota as any request of it does (docs/batches.md)."""
        if not self.enabled:
            return None, None
        found, stored = None, False
        for _, quota in self._keys:
            if quota.key_id == key_id:
                found = quota
        if key_id in self._stored:
            found, stored = self._stored[key_id][1], True
        if found is None:
            raise Unauthorized("the API key that created this batch no longer exists (revoked)",
                               code="invalid_api_key")
        if stored and self._stale():
            raise ControlStale(self.sync.refusal("stored API keys"), code="control_store_unavailable")
        if found.expires_at is not None and time.time() >= found.expires_at:
            raise Unauthorized("the API key that created this batch has expired", code="expired_api_key")
        return found, await found.admit()

    def knows(self, authorization: str | None) -> bool:
        """Whether the header carries a valid key (no quota is counted: for open routes)."""
        scheme, _, token = (authorization or "").partition(" ")
        if not (self.enabled and scheme.lower() == "bearer" and token.strip()):
            return False
        found, stored = self._find(token)
        return found is not None and not (stored and self._stale())

    def _stale(self) -> bool:
        return self.sync is not None and self.sync.stale() is not None

    def _find(self, token: str) -> tuple[KeyQuota | None, bool]:
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
