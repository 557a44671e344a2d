"""Authorization: Bearer <key>, and per-key quotas.

Keys may be configured in clear or as "sha256:<hex>" so that a config file holds no secrets.
Only digests are kept and compared (constant time, equal length); keys are never logged.
Quotas are sliding one-minute windows of requests and of tokens per key; past them, 429 with
Retry-After saying when the window frees up.

Tokens are reserved before any work and settled when the request ends: the engine reserves
prompt tokens + n * max_tokens once it has tokenized the prompt and resolved max_tokens (chat
without max_tokens: the room the prompt leaves, so prompt + budget = the endpoint's context per
sequence), and settles to what it computed (prompt tokens prefilled + tokens generated) however
the request ended: finished, aborted by a client that left, failed or timed out. So a burst is
admitted only while its reservations fit, and nobody gets tokens for free by disconnecting.

A stored key may also limit its requests in flight (`max_parallel`) and its tokens per UTC day or
month (`budget_tokens`): api/key_limits. In memory, the budget's "used" is the usage table's total
for the period plus this process's unflushed usage (control/budget.BudgetBook).
"""

from __future__ import annotations

import hashlib
import hmac
import time
from collections import deque

from fastapi import Request

from ..errors import Forbidden, RateLimited, Unauthorized
from ..settings import KeySpec
from .key_limits import Slot, budget_exceeded, parallel_exceeded

WINDOW = 60.0


class Charge:
    """One engine request's tokens in its key's window: reserved at admission, then settled."""

    __slots__ = ("at", "tokens", "expired", "settled")

    def __init__(self, at: float, tokens: int) -> None:
        self.at, self.tokens, self.expired, self.settled = at, tokens, False, False


class Quota:
    def __init__(self, rpm: int, tpm: int, endpoints: frozenset[str] | None = None,
                 expires_at: int | None = None) -> None:
        self.rpm, self.tpm = rpm, tpm
        self.endpoints = endpoints          # a stored key may be limited to these endpoints
        self.key_id = ""                    # the key's id in usage records (never its secret)
        self.expires_at = expires_at        # unix seconds (a stored key's expiry)
        self.max_parallel = 0               # requests in flight at once (0: no limit)
        self.budget_tokens = 0              # tokens per budget_period (0: no budget)
        self.budget_period: str | None = None
        self.book = None                    # control/budget.BudgetBook: what the budget's period used
        self.in_flight = 0
        self._requests: deque[float] = deque()
        self._tokens: deque[Charge] = deque()
        self._token_sum = 0

    def _expire(self, now: float) -> None:
        while self._requests and self._requests[0] <= now - WINDOW:
            self._requests.popleft()
        while self._tokens and self._tokens[0].at <= now - WINDOW:
            c = self._tokens.popleft()
            c.expired = True
            self._token_sum -= c.tokens

    @property
    def used(self) -> int:
        """Tokens spent or reserved in the last minute."""
        self._expire(time.monotonic())
        return self._token_sum

    def admit(self, now: float) -> Slot:
        """Called as a request arrives: counts it and gives it a slot among the key's in-flight
        requests (released when the request has ended), or raises RateLimited."""
        self._expire(now)
        if self.max_parallel and self.in_flight >= self.max_parallel:
            raise parallel_exceeded(self.max_parallel)
        if self.rpm and len(self._requests) >= self.rpm:
            raise RateLimited(f"rate limit: {self.rpm} requests per minute for this key",
                              code="rate_limit_exceeded", retry_after=self._requests[0] + WINDOW - now)
        if self.tpm and self._token_sum >= self.tpm:
            raise RateLimited(f"rate limit: {self.tpm} tokens per minute for this key "
                              f"({self._token_sum} used in the last minute)",
                              code="rate_limit_exceeded", retry_after=self._tokens[0].at + WINDOW - now)
        if self.budget_tokens and self.budget_period and self.book is not None:
            used = self.book.used(self.key_id, self.budget_period)
            if used >= self.budget_tokens:
                raise budget_exceeded(self.budget_tokens, self.budget_period, used)
        self._requests.append(now)
        self.in_flight += 1
        return Slot(self._release)

    def _release(self) -> None:
        self.in_flight -= 1

    @property
    def metered(self) -> bool:
        """Whether its engine requests need reserve/settle (a tpm window, or a budget counted there)."""
        return bool(self.tpm)

    def reserve(self, tokens: int, now: float) -> Charge:
        """Before any work: the most a request may use, or RateLimited if that does not fit."""
        self._expire(now)
        if self.tpm and self._token_sum + tokens > self.tpm:
            why = (f"rate limit: {self.tpm} tokens per minute for this key ({self._token_sum} used in "
                   f"the last minute); this request may use up to {tokens} tokens (prompt + max_tokens)")
            if tokens > self.tpm:   # can never fit: say so rather than let the client wait
                raise RateLimited(why + f", more than the whole quota; lower max_tokens or shorten the prompt",
                                  code="rate_limit_exceeded", retry_after=WINDOW)
            raise RateLimited(why, code="rate_limit_exceeded", retry_after=self._frees(tokens, now))
        charge = Charge(now, tokens)
        self._tokens.append(charge)
        self._token_sum += tokens
        return charge

    def settle(self, charge: Charge, tokens: int) -> None:
        """When the request ends: its reservation becomes what it actually used."""
        if charge.settled:
            return
        charge.settled = True
        if not charge.expired:     # a charge older than the window no longer counts either way
            self._token_sum += tokens - charge.tokens
            charge.tokens = tokens

    def spend(self, tokens: int, now: float) -> None:
        """Charge after the fact, for an engine that does not meter (a remote one: only the
        upstream tokenizes, so nothing is known before its answer)."""
        self._expire(now)
        self._tokens.append(Charge(now, tokens))
        self._token_sum += tokens

    def meter(self) -> "Meter":
        return Meter(self)

    def _frees(self, tokens: int, now: float) -> float:
        """Seconds until enough of the window expires for `tokens` more to fit."""
        left = self._token_sum
        for c in self._tokens:
            left -= c.tokens
            if left + tokens <= self.tpm:
                return c.at + WINDOW - now
        return WINDOW


class Meter:
    """The reserve/settle pair one EngineRequest carries (see engine.types.EngineRequest)."""

    def __init__(self, quota: Quota) -> None:
        self.quota = quota
        self.charge: Charge | None = None

    def reserve(self, tokens: int) -> None:
        self.charge = self.quota.reserve(tokens, time.monotonic())

    def settle(self, tokens: int) -> None:
        if self.charge is not None:
            self.quota.settle(self.charge, tokens)


class KeyChecker:
    """Configured keys (the TOML file, the environment) and, with the control plane, the keys of
    its store: `replace_stored` swaps those in (control/sync, every second), keeping the quota
    windows of keys that stay."""

    def __init__(self, keys: tuple[KeySpec, ...], control: bool = False, shared=None) -> None:
        # shared: api/shared_quota.RedisQuotas, whose windows every process sees
        self._make = shared.quota if shared is not None else (lambda rpm, tpm, ident: Quota(rpm, tpm))
        self._keys = [(d, self._make(k.rpm, k.tpm, d)) for k in keys for d in (_configured_digest(k.key),)]
        for d, quota in self._keys:      # usage rows name a configured key by its digest's start
            quota.key_id = f"config:{d.hex()[:12]}"
        self._control = control
        # key id -> ((digest, valid until or None), ...), quota): a rotated key has two digests
        self._stored: dict[str, tuple[tuple[tuple[bytes, int | None], ...], Quota]] = {}
        self.book = None       # control/budget.BudgetBook (memory budgets), set by the app's lifespan

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
        found = self._find(token)
        if found is None:
            raise Unauthorized("invalid API key", code="invalid_api_key")
        if found.expires_at is not None and time.time() >= found.expires_at:
            raise Unauthorized("this API key has expired", code="expired_api_key")
        return found, found.admit(time.monotonic())

    def knows(self, authorization: str | None) -> bool:
        """Whether the header carries a valid key (no quota is counted: for open routes)."""
        scheme, _, token = (authorization or "").partition(" ")
        return self.enabled and scheme.lower() == "bearer" and bool(token.strip()) and \
            self._find(token) is not None

    def _find(self, token: str) -> Quota | None:
        digest = hashlib.sha256(token.strip().encode()).digest()
        found = None
        # no early exit: the time taken does not depend on which key matched
        for d, quota in self._keys:
            if hmac.compare_digest(d, digest):
                found = quota
        now = time.time()
        for digests, quota in self._stored.values():
            for d, until in digests:      # a rotated key's previous secret, until its grace ends
                if hmac.compare_digest(d, digest) and (until is None or now < until):
                    found = quota
        return found


def check_endpoint(request: Request, endpoint: str) -> None:
    """A key limited to some endpoints (control plane) may use only those."""
    quota = getattr(request.state, "quota", None)
    if quota is not None and quota.endpoints is not None and endpoint not in quota.endpoints:
        raise Forbidden(f"this API key may not use model endpoint {endpoint!r}", param="model",
                        code="endpoint_not_allowed")


def _configured_digest(key: str) -> bytes:
    return bytes.fromhex(key[7:]) if key.startswith("sha256:") else hashlib.sha256(key.encode()).digest()


async def require_key(request: Request) -> None:
    """FastAPI dependency on every API route. The slot is released by api/middleware.ReleaseSlot
    once the response has ended, however it ended."""
    request.state.quota, request.state.slot = request.app.state.keys.admit(request.headers.get("authorization"))


def may_see_reasons(request: Request) -> bool:
    """Whether this caller may be told why an endpoint is not ready (file paths, exception text,
    upstream hosts; secrets are redacted for everyone): a holder of a valid key, or anyone when
    the server has no keys and listens on loopback only (its callers are this machine's users,
    who can read its log). Everyone else gets states only."""
    keys = request.app.state.keys
    if keys.enabled:
        return keys.knows(request.headers.get("authorization"))
    return request.app.state.settings.loopback
