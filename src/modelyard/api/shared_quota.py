"""Per-key quotas shared by every gateway process through Redis (`[quota] backend = "redis"`).

The same sliding one-minute windows as api/auth.Quota, kept in Redis instead of this process's
memory, so N gateways behind a load balancer allow a key its quota once, not N times:

- each key has two sorted sets (named by a digest of the key's digest: no secret reaches Redis):
  its requests and its token charges, scored by Redis's own clock (TIME), so processes on
  machines with skewed clocks agree;
- one Lua script per admission checks and counts the request (rpm, and tpm already spent), one per
  reservation checks and charges the tokens (tpm): each is atomic, so concurrent processes cannot
  both take the last slot; a sliding window, never a fixed one that lets 2x through at its edge;
- settling replaces a reservation by what was used, as in memory.

If Redis cannot be reached (refused, or slower than TIMEOUT), this process falls back to a local
window of quota / `processes` (never to unlimited), says so in the log and in the
`modelyard_quota_fallback` gauge, and tries Redis again every RETRY seconds.
"""

from __future__ import annotations

import hashlib
import logging
import os
import time
from typing import Callable

from ..errors import RateLimited
from .auth import WINDOW, Charge, Quota
from .key_limits import Slot

log = logging.getLogger("modelyard.quota")
TIMEOUT = 0.25        # seconds for one Redis call before this process falls back
RETRY = 1.0           # seconds between attempts to get back to Redis

_SUM = """
local function token_sum(key)
  local total = 0
  for _, m in ipairs(redis.call('ZRANGE', key, 0, -1)) do
    total = total + tonumber(string.match(m, ':(%d+)$'))
  end
  return total
end
local function now_and_expire(keys)
  local t = redis.call('TIME')
  local now = tonumber(t[1]) + tonumber(t[2]) / 1000000
  for _, k in ipairs(keys) do
    redis.call('ZREMRANGEBYSCORE', k, '-inf', now - __WINDOW__)
  end
  return now
end
"""

# KEYS: requests, tokens. ARGV: rpm, tpm, request id. -> {1} or {0, which, retry_after}
ADMIT = _SUM + """
local now = now_and_expire(KEYS)
local rpm, tpm = tonumber(ARGV[1]), tonumber(ARGV[2])
if rpm > 0 and redis.call('ZCARD', KEYS[1]) >= rpm then
  local oldest = redis.call('ZRANGE', KEYS[1], 0, 0, 'WITHSCORES')
  return {0, 'rpm', tostring(tonumber(oldest[2]) + __WINDOW__ - now)}
end
if tpm > 0 then
  local used = token_sum(KEYS[2])
  if used >= tpm then
    local oldest = redis.call('ZRANGE', KEYS[2], 0, 0, 'WITHSCORES')
    return {0, 'tpm', tostring(tonumber(oldest[2]) + __WINDOW__ - now), tostring(used)}
  end
end
redis.call('ZADD', KEYS[1], now, ARGV[3])
redis.call('EXPIRE', KEYS[1], __TTL__)
return {1}
"""

# KEYS: tokens. ARGV: tpm, charge id, tokens, check (1: refuse past tpm). -> {1, score} or {0, used}
RESERVE = _SUM + """
local now = now_and_expire(KEYS)
local tpm, tokens = tonumber(ARGV[1]), tonumber(ARGV[3])
if ARGV[4] == '1' and tpm > 0 then
  local used = token_sum(KEYS[1])
  if used + tokens > tpm then return {0, tostring(used)} end
end
redis.call('ZADD', KEYS[1], now, ARGV[2] .. ':' .. ARGV[3])
redis.call('EXPIRE', KEYS[1], __TTL__)
return {1, tostring(now)}
"""

# KEYS: tokens. ARGV: charge id, reserved, used. The charge keeps its time; gone if expired.
SETTLE = """
local old = ARGV[1] .. ':' .. ARGV[2]
local score = redis.call('ZSCORE', KEYS[1], old)
if score then
  redis.call('ZREM', KEYS[1], old)
  redis.call('ZADD', KEYS[1], score, ARGV[1] .. ':' .. ARGV[3])
end
return 1
"""


def _lua(source: str) -> str:
    return source.replace("__WINDOW__", str(WINDOW)).replace("__TTL__", str(int(WINDOW) + 1))


ADMIT, RESERVE = _lua(ADMIT), _lua(RESERVE)


class SharedCharge(Charge):
    __slots__ = ("id", "local")

    def __init__(self, at: float, tokens: int, charge_id: str, local: Charge | None = None) -> None:
        super().__init__(at, tokens)
        self.id, self.local = charge_id, local


class RedisQuotas:
    """The connection, the scripts, and whether this process is on its local fallback."""

    def __init__(self, url: str, processes: int, client=None) -> None:
        import redis
        self._errors = (redis.exceptions.ConnectionError, redis.exceptions.TimeoutError)
        self.redis = client or redis.Redis.from_url(url, socket_timeout=TIMEOUT, socket_connect_timeout=TIMEOUT)
        self.processes = max(1, processes)
        self._admit = self.redis.register_script(ADMIT)
        self._reserve = self.redis.register_script(RESERVE)
        self._settle = self.redis.register_script(SETTLE)
        self.fallback = False
        self._down_since = 0.0
        self.fallbacks = 0            # times this process fell back (a counter for /metrics)

    def quota(self, rpm: int, tpm: int, ident: bytes) -> "SharedQuota":
        return SharedQuota(self, rpm, tpm, ident)

    def call(self, script, keys: list[str], args: list, local: Callable[[], object]):
        """Run `script` on Redis, or `local()` while Redis is unreachable."""
        now = time.monotonic()
        if self.fallback and now - self._down_since < RETRY:
            return local()
        try:
            out = script(keys=keys, args=args)
        except self._errors as exc:
            if not self.fallback:
                log.error("Redis unreachable for quotas (%s: %s): each key gets 1/%d of its quota in this "
                          "process until it answers", type(exc).__name__, exc, self.processes)
                self.fallbacks += 1
            self.fallback, self._down_since = True, now
            return local()
        if self.fallback:
            log.warning("Redis answers again: quotas are shared across processes again")
            self.fallback = False
        return out


class SharedQuota(Quota):
    """Quota's interface over Redis; its own in-memory windows (rpm/N, tpm/N) are the fallback."""

    def __init__(self, backend: RedisQuotas, rpm: int, tpm: int, ident: bytes) -> None:
        super().__init__(rpm, tpm)
        self.backend = backend
        name = hashlib.sha256(b"modelyard-quota:" + ident).hexdigest()[:24]
        self._keys = [f"modelyard:q:{name}:req", f"modelyard:q:{name}:tok"]
        self._local = Quota(self._share(rpm), self._share(tpm))

    def _share(self, limit: int) -> int:
        return max(1, limit // self.backend.processes) if limit else 0

    def _sync_local(self) -> None:     # limits may change at run time (the control plane)
        self._local.rpm, self._local.tpm = self._share(self.rpm), self._share(self.tpm)

    @property
    def used(self) -> int:
        return self._local.used

    def admit(self, now: float) -> Slot | None:
        self._sync_local()
        out = self.backend.call(self.backend._admit, self._keys, [self.rpm, self.tpm, _uid()],
                                lambda: self._local.admit(now))
        if isinstance(out, Slot):
            return out
        if out[0] == 1:
            return None
        which, retry = out[1].decode(), float(out[2])
        if which == "rpm":
            raise RateLimited(f"rate limit: {self.rpm} requests per minute for this key",
                              code="rate_limit_exceeded", retry_after=max(retry, 0.0))
        raise RateLimited(f"rate limit: {self.tpm} tokens per minute for this key ({int(out[3])} used in "
                          "the last minute)", code="rate_limit_exceeded", retry_after=max(retry, 0.0))

    def reserve(self, tokens: int, now: float) -> Charge:
        return self._charge(tokens, now, check=True)

    def spend(self, tokens: int, now: float) -> None:
        self._charge(tokens, now, check=False)

    def _charge(self, tokens: int, now: float, check: bool) -> Charge:
        self._sync_local()
        charge_id = _uid()

        def local():
            if check:
                return ("local", self._local.reserve(tokens, now))
            self._local.spend(tokens, now)
            return ("local", None)
        out = self.backend.call(self.backend._reserve, self._keys[1:], [self.tpm, charge_id, tokens, int(check)], local)
        if isinstance(out, tuple):
            return SharedCharge(now, tokens, charge_id, local=out[1])
        if out[0] != 1:
            used = int(out[1])
            why = (f"rate limit: {self.tpm} tokens per minute for this key ({used} used in the last minute); "
                   f"this request may use up to {tokens} tokens (prompt + max_tokens)")
            if tokens > self.tpm:
                raise RateLimited(why + ", more than the whole quota; lower max_tokens or shorten the prompt",
                                  code="rate_limit_exceeded", retry_after=WINDOW)
            raise RateLimited(why, code="rate_limit_exceeded", retry_after=1.0)
        return SharedCharge(now, tokens, charge_id)

    def settle(self, charge: Charge, tokens: int) -> None:
        if charge.settled:
            return
        charge.settled = True
        if isinstance(charge, SharedCharge) and charge.local is not None:
            self._local.settle(charge.local, tokens)
            return
        if isinstance(charge, SharedCharge):
            self.backend.call(self.backend._settle, self._keys[1:], [charge.id, charge.tokens, tokens], lambda: None)
            charge.tokens = tokens


def _uid() -> str:
    return os.urandom(8).hex()
