"""Per-key quotas shared by every gateway process through Redis (`[quota] backend = "redis"`).

The same sliding one-minute windows as quota/memory.Quota, kept in Redis instead of this process's
memory, so N gateways behind a load balancer allow a key its quota once, not N times:

- each key has two sorted sets (named by a digest of the key's digest: no secret reaches Redis):
  its requests and its token charges, scored by Redis's own clock (TIME), so processes on
  machines with skewed clocks agree;
- one Lua script per admission checks and counts the request (rpm, and tpm already spent), one per
  reservation checks and charges the tokens (tpm): each is atomic, so concurrent processes cannot
  both take the last slot; a sliding window, never a fixed one that lets 2x through at its edge;
- settling replaces a reservation by what was used, as in memory;
- a key's `max_parallel`: in-flight slots are leases in a third sorted set scored by their expiry
  (Redis's clock + LEASE). The admission script drops lapsed leases, checks the count and adds the
  request's lease with the other limits, atomically; the holder renews its leases every
  RENEW_EVERY seconds (a thread) and removes its lease when the request has ended. A process
  killed mid-request stops renewing: its slots free themselves within LEASE seconds;
- a key's token budget: one counter per key and period (UTC day or month, by this process's
  calendar), checked at admission and charged as each request settles (INCRBY), whichever way
  it ended; it expires when its period ends. A budget is overshot by at most the tokens of the
  requests in flight when it is reached.

If Redis cannot be reached (refused, or slower than TIMEOUT), this process falls back to a local
window of quota / `processes` (never to unlimited; max_parallel too), says so in the log and in
the `modelyard_quota_fallback` gauge, and tries Redis again every RETRY seconds. The budget is
then checked against what Redis last said plus what this process charged since, which it adds to
Redis once it answers. A call that timed out may still have run when Redis woke: its request
(or lease) counts although refused here: over-counted (for a minute, or LEASE seconds), never under.
"""

from __future__ import annotations

import hashlib
import logging
import os
import threading
import time
from typing import Callable

from ..errors import RateLimited
from .memory import WINDOW, Charge, Quota
from .limits import Slot, budget_exceeded, parallel_exceeded, period_bounds

log = logging.getLogger("modelyard.quota")
TIMEOUT = 0.25        # seconds for one Redis call before this process falls back
RETRY = 1.0           # seconds between attempts to get back to Redis
LEASE = 10.0          # seconds an in-flight slot lives in Redis unless its holder renews it
RENEW_EVERY = LEASE / 4

# The token window is a sorted set of "<charge id>:<tokens>" scored by time, beside a running
# sum of what it holds (`<tokens>:sum`): an admission reads the sum and drops only what expired,
# so its cost does not grow with the requests in the window (a scan of the set did: O(requests
# per minute) per admission, milliseconds at a thousand requests a second). Both keys get the
# same TTL at every write; a sum key that is missing while the set is not is rebuilt once.
_SUM = """
local function scan_sum(key)
  local total = 0
  for _, m in ipairs(redis.call('ZRANGE', key, 0, -1)) do
    total = total + tonumber(string.match(m, ':(%d+)$'))
  end
  return total
end
local function clock()
  local t = redis.call('TIME')
  return tonumber(t[1]) + tonumber(t[2]) / 1000000
end
-- drops the charges older than the window; returns the tokens still in it
local function token_sum(key, sumkey, now)
  local old = redis.call('ZRANGEBYSCORE', key, '-inf', now - __WINDOW__)
  local sum = redis.call('GET', sumkey)
  if not sum then
    redis.call('ZREMRANGEBYSCORE', key, '-inf', now - __WINDOW__)
    sum = scan_sum(key)
    redis.call('SET', sumkey, sum, 'EX', __TTL__)
    return sum
  end
  sum = tonumber(sum)
  if #old > 0 then
    for _, m in ipairs(old) do sum = sum - tonumber(string.match(m, ':(%d+)$')) end
    redis.call('ZREMRANGEBYSCORE', key, '-inf', now - __WINDOW__)
    redis.call('SET', sumkey, sum, 'KEEPTTL')
  end
  return sum
end
"""

# KEYS: requests, tokens, in-flight leases, tokens' sum, budget counter. ARGV: rpm, tpm, request
# id, max_parallel, lease seconds, budget_tokens. -> {1, budget used} or {0, which, retry_after, used}
ADMIT = _SUM + """
local now = clock()
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now - __WINDOW__)
local rpm, tpm = tonumber(ARGV[1]), tonumber(ARGV[2])
local maxp, lease, budget = tonumber(ARGV[4]), tonumber(ARGV[5]), tonumber(ARGV[6])
if maxp > 0 then
  redis.call('ZREMRANGEBYSCORE', KEYS[3], '-inf', now)     -- leases nobody renewed: a dead holder
  if redis.call('ZCARD', KEYS[3]) >= maxp then return {0, 'parallel', '1', '0'} end
end
if rpm > 0 and redis.call('ZCARD', KEYS[1]) >= rpm then
  local oldest = redis.call('ZRANGE', KEYS[1], 0, 0, 'WITHSCORES')
  return {0, 'rpm', tostring(tonumber(oldest[2]) + __WINDOW__ - now), '0'}
end
if tpm > 0 then
  local used = token_sum(KEYS[2], KEYS[4], now)
  if used >= tpm then
    local oldest = redis.call('ZRANGE', KEYS[2], 0, 0, 'WITHSCORES')
    return {0, 'tpm', tostring(tonumber(oldest[2]) + __WINDOW__ - now), tostring(used)}
  end
end
local spent = 0
if budget > 0 then
  spent = tonumber(redis.call('GET', KEYS[5]) or '0')
  if spent >= budget then return {0, 'budget', '0', tostring(spent)} end
end
redis.call('ZADD', KEYS[1], now, ARGV[3])
redis.call('EXPIRE', KEYS[1], __TTL__)
if maxp > 0 then
  redis.call('ZADD', KEYS[3], now + lease, ARGV[3])
  redis.call('EXPIRE', KEYS[3], math.ceil(lease * 2))
end
return {1, tostring(spent)}
"""

# KEYS: tokens, tokens' sum. ARGV: tpm, charge id, tokens, check (1: refuse past tpm).
# -> {1, score} or {0, used}
RESERVE = _SUM + """
local now = clock()
local tpm, tokens = tonumber(ARGV[1]), tonumber(ARGV[3])
local used = token_sum(KEYS[1], KEYS[2], now)
if ARGV[4] == '1' and tpm > 0 and used + tokens > tpm then return {0, tostring(used)} end
redis.call('ZADD', KEYS[1], now, ARGV[2] .. ':' .. ARGV[3])
redis.call('SET', KEYS[2], used + tokens, 'EX', __TTL__)
redis.call('EXPIRE', KEYS[1], __TTL__)
return {1, tostring(now)}
"""

# KEYS: tokens, tokens' sum. ARGV: charge id, reserved, used. The charge keeps its time; gone
# (and out of the sum) if it expired meanwhile.
SETTLE = """
local old = ARGV[1] .. ':' .. ARGV[2]
local score = redis.call('ZSCORE', KEYS[1], old)
if score then
  redis.call('ZREM', KEYS[1], old)
  redis.call('ZADD', KEYS[1], score, ARGV[1] .. ':' .. ARGV[3])
  if redis.call('EXISTS', KEYS[2]) == 1 then
    redis.call('INCRBY', KEYS[2], tonumber(ARGV[3]) - tonumber(ARGV[2]))
  end
end
return 1
"""


# KEYS: in-flight leases, one per id. ARGV: lease seconds, ids. Only leases still held are renewed.
RENEW = """
local t = redis.call('TIME')
local until_ = tonumber(t[1]) + tonumber(t[2]) / 1000000 + tonumber(ARGV[1])
for i, k in ipairs(KEYS) do
  redis.call('ZADD', k, 'XX', until_, ARGV[i + 1])
  redis.call('EXPIRE', k, math.ceil(tonumber(ARGV[1]) * 2))
end
return 1
"""

RELEASE = "redis.call('ZREM', KEYS[1], ARGV[1]) return 1"

# KEYS: budget counter. ARGV: tokens, unix time its period ends (the counter goes then).
CHARGE = """
local v = redis.call('INCRBY', KEYS[1], ARGV[1])
redis.call('EXPIREAT', KEYS[1], ARGV[2])
return v
"""


def _lua(source: str) -> str:
    return source.replace("__WINDOW__", str(WINDOW)).replace("__TTL__", str(int(WINDOW) + 1))


ADMIT, RESERVE, SETTLE = _lua(ADMIT), _lua(RESERVE), _lua(SETTLE)


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
        self._renew = self.redis.register_script(RENEW)
        self._release = self.redis.register_script(RELEASE)
        self._charge_budget = self.redis.register_script(CHARGE)
        self._held: dict[str, str] = {}         # lease id -> its key's in-flight set, renewed while held
        self._held_lock = threading.Lock()
        self._renewer: threading.Thread | None = None
        self._closed = threading.Event()
        self.fallback = False
        self._down_since = 0.0
        self.fallbacks = 0            # times this process fell back (a counter for /metrics)

    def quota(self, rpm: int, tpm: int, ident: bytes) -> "SharedQuota":
        return SharedQuota(self, rpm, tpm, ident)

    def hold(self, lease_id: str, inflight: str) -> Slot:
        """A lease admitted in Redis: renewed every RENEW_EVERY seconds from a thread of this
        process until released; a process that dies stops renewing, and its leases lapse."""
        with self._held_lock:
            self._held[lease_id] = inflight
            if self._renewer is None:
                self._renewer = threading.Thread(target=self._renew_loop, name="modelyard-quota-leases", daemon=True)
                self._renewer.start()

        def release() -> None:
            with self._held_lock:
                self._held.pop(lease_id, None)
            self.call(self._release, [inflight], [lease_id], lambda: None)   # else it lapses
        return Slot(release)

    def _renew_loop(self) -> None:
        while not self._closed.wait(RENEW_EVERY):
            with self._held_lock:
                held = list(self._held.items())
            if not held:
                continue
            try:
                self._renew(keys=[k for _, k in held], args=[LEASE, *(i for i, _ in held)])
            except self._errors as exc:
                log.warning("cannot renew %d in-flight leases on Redis (%s): they lapse after %.0f s",
                            len(held), type(exc).__name__, LEASE)

    def close(self) -> None:
        self._closed.set()
        if self._renewer is not None:
            self._renewer.join(5)

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
        self._keys = [f"modelyard:q:{name}:req", f"modelyard:q:{name}:tok", f"modelyard:q:{name}:inflight",
                      f"modelyard:q:{name}:tok:sum"]
        self._token_keys = [self._keys[1], self._keys[3]]
        self._budget_prefix = f"modelyard:q:{name}:budget:"
        self._local = Quota(self._share(rpm), self._share(tpm))
        self._budget_seen = 0       # the counter as Redis last said (checked against while it is down)
        self._budget_owed = 0       # tokens charged while Redis was down, added once it answers

    def _share(self, limit: int) -> int:
        return max(1, limit // self.backend.processes) if limit else 0

    def _sync_local(self) -> None:     # limits may change at run time (the control plane)
        self._local.rpm, self._local.tpm = self._share(self.rpm), self._share(self.tpm)
        self._local.max_parallel = self._share(self.max_parallel)

    @property
    def metered(self) -> bool:
        return bool(self.tpm or self.budget_tokens)      # a budget is charged as requests settle

    def _budget_key(self) -> tuple[str, int]:
        start, end = period_bounds(self.budget_period or "day")
        return f"{self._budget_prefix}{self.budget_period}:{start}", end

    def _local_admit(self, now: float) -> Slot:
        """While Redis is down: this process's share of every limit; the budget against what Redis
        last said plus what was charged here since."""
        if self.budget_tokens and self._budget_seen + self._budget_owed >= self.budget_tokens:
            raise budget_exceeded(self.budget_tokens, self.budget_period or "day", self._budget_seen + self._budget_owed)
        return self._local.admit(now)

    @property
    def used(self) -> int:
        return self._local.used

    def admit(self, now: float) -> Slot | None:
        self._sync_local()
        budget = self.budget_tokens if self.budget_period else 0
        if budget and self._budget_owed:
            self._charge_budget(0)         # what was charged here while Redis was down, first
        lease_id = _uid()
        out = self.backend.call(self.backend._admit, [*self._keys, self._budget_key()[0]],
                                [self.rpm, self.tpm, lease_id, self.max_parallel, LEASE, budget],
                                lambda: self._local_admit(now))
        if isinstance(out, Slot):
            return out
        if out[0] == 1:
            self._budget_seen = int(out[1])
            return self.backend.hold(lease_id, self._keys[2]) if self.max_parallel else None
        which, retry = out[1].decode(), float(out[2])
        if which == "parallel":
            raise parallel_exceeded(self.max_parallel)
        if which == "budget":
            self._budget_seen = int(out[3])
            raise budget_exceeded(self.budget_tokens, self.budget_period or "day", int(out[3]))
        if which == "rpm":
            raise RateLimited(f"rate limit: {self.rpm} requests per minute for this key",
                              code="rate_limit_exceeded", retry_after=max(retry, 0.0))
        raise RateLimited(f"rate limit: {self.tpm} tokens per minute for this key ({int(out[3])} used in "
                          "the last minute)", code="rate_limit_exceeded", retry_after=max(retry, 0.0))

    def reserve(self, tokens: int, now: float) -> Charge:
        if not self.tpm:              # metered for its budget only: nothing to reserve
            return SharedCharge(now, tokens, "")
        return self._charge(tokens, now, check=True)

    def spend(self, tokens: int, now: float) -> None:
        self._charge_budget(tokens)
        if self.tpm:
            self._charge(tokens, now, check=False)

    def _charge_budget(self, tokens: int) -> None:
        """The period's counter in Redis, charged with what a request used once it has ended."""
        if not (self.budget_tokens and self.budget_period) or tokens + self._budget_owed <= 0:
            return
        key, end = self._budget_key()
        owed, self._budget_owed = self._budget_owed + tokens, 0

        def down() -> None:
            self._budget_owed += owed
        out = self.backend.call(self.backend._charge_budget, [key], [owed, end], down)
        if out is not None:
            self._budget_seen = int(out)

    def _charge(self, tokens: int, now: float, check: bool) -> Charge:
        self._sync_local()
        charge_id = _uid()

        def local():
            if check:
                return ("local", self._local.reserve(tokens, now))
            self._local.spend(tokens, now)
            return ("local", None)
        out = self.backend.call(self.backend._reserve, self._token_keys, [self.tpm, charge_id, tokens, int(check)],
                                local)
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
        self._charge_budget(tokens)
        if isinstance(charge, SharedCharge) and not charge.id:       # no tpm window to settle
            return
        if isinstance(charge, SharedCharge) and charge.local is not None:
            self._local.settle(charge.local, tokens)
            return
        if isinstance(charge, SharedCharge):
            self.backend.call(self.backend._settle, self._token_keys, [charge.id, charge.tokens, tokens],
                              lambda: None)
            charge.tokens = tokens


def _uid() -> str:
    return os.urandom(8).hex()
