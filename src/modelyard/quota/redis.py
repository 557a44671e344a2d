"""Counting a key's quota in Redis (`[quota] backend = "redis"`), shared by every gateway process,
so N gateways behind a load balancer allow a key its quota once, not N times. The policy (limits,
429s, the fallback) is quota/policy's; the scripts are quota/redis_scripts.

- each key has two sorted sets, its requests and its token charges, named by a digest of the
  key's stable identity (quota/keys: no secret reaches Redis), scored by Redis's own clock;
- one Lua script per admission checks and counts the request (rpm, and tpm or budget already
  spent), one per reservation checks and holds the tokens in the tpm window AND the budget: each
  is atomic, so concurrent processes cannot both take the last of a limit; sliding windows, never
  a fixed one that lets 2x through at its edge;
- settling replaces a reservation by what was used, in the window and the budget (an overage
  included);
- max_parallel: in-flight slots are leases in a third sorted set scored by their expiry (Redis's
  clock + LEASE). The admission script drops lapsed leases, checks the count and adds the
  request's lease with the other limits, atomically; the holder renews its leases every
  RENEW_EVERY seconds (an asyncio task) and removes its lease when the request has ended. A
  process killed mid-request stops renewing: its slots free themselves within LEASE seconds;
- the budget: one counter per key and period (UTC day or month, by this process's calendar),
  increased by each reservation that fits and corrected at settle; it expires when its period
  ends. So the tokens served in a period never pass the budget while Redis answers (a request
  computes at most what it reserved; a remote engine's after-the-fact charge is the exception).
  A process killed between reserve and settle leaves its reservation counted: the safe side.

The client is redis.asyncio with socket timeouts of TIMEOUT, and every call is also bounded by the
policy's wait_for: a hung Redis (SIGSTOP) is the fallback within TIMEOUT, never a stalled loop.
While it is down the budget is checked against what Redis last said plus what this process charged
since (`owed`), which the next admission adds to the counter once Redis answers. A settle that
could not reach Redis owes an overage; a saving is forgotten (the reservation stays counted).
"""

from __future__ import annotations

import asyncio
import logging
import os

from .limits import KeyLimits, Refusal, Slot, period_bounds
from .memory import LocalBudget, MemoryStore
from .policy import Backend, KeyQuota, Store
from .redis_scripts import ADMIT, RELEASE, RENEW, RESERVE, SETTLE

log = logging.getLogger("modelyard.quota")
TIMEOUT = 0.25        # seconds for one Redis call before this process falls back
LEASE = 10.0          # seconds an in-flight slot lives in Redis unless its holder renews it
RENEW_EVERY = LEASE / 4


class RedisQuotas(Backend):
    """The connection, the scripts, the leases this process holds (renewed by one task)."""

    name = "Redis"
    timeout = TIMEOUT
    bounded_by_client = True        # socket_timeout and socket_connect_timeout are TIMEOUT

    def __init__(self, url: str, processes: int, client=None) -> None:
        import redis
        import redis.asyncio
        super().__init__(processes)
        self.errors = (redis.exceptions.ConnectionError, redis.exceptions.TimeoutError)
        self.redis = client or redis.asyncio.Redis.from_url(url, socket_timeout=TIMEOUT,
                                                            socket_connect_timeout=TIMEOUT)
        self.admit_script = self.redis.register_script(ADMIT)
        self.reserve_script = self.redis.register_script(RESERVE)
        self.settle_script = self.redis.register_script(SETTLE)
        self._renew = self.redis.register_script(RENEW)
        self._release = self.redis.register_script(RELEASE)
        self._held: dict[str, str] = {}         # lease id -> its key's in-flight set, renewed while held
        self._renewer: asyncio.Task | None = None

    def stores(self, quota: KeyQuota, name: str) -> tuple[Store, Store | None]:
        shared = RedisStore(self, name)
        return shared, MemoryStore(LocalBudget(lambda: shared.seen + shared.owed, shared.owe))

    def hold(self, lease_id: str, inflight: str) -> Slot:
        """A lease admitted in Redis, renewed until released; a process that dies stops renewing,
        and its leases lapse."""
        self._held[lease_id] = inflight
        if self._renewer is None or self._renewer.done():
            self._renewer = asyncio.get_running_loop().create_task(self._renew_loop(), name="modelyard-quota-leases")

        def release() -> None:
            self._held.pop(lease_id, None)
            self.background.spawn(self._give_back(inflight, lease_id))
        return Slot(release)

    async def _give_back(self, inflight: str, lease_id: str) -> None:
        try:
            await asyncio.wait_for(self._release(keys=[inflight], args=[lease_id]), TIMEOUT)
        except (asyncio.TimeoutError, *self.errors):
            pass        # it lapses after LEASE

    async def _renew_loop(self) -> None:
        while True:
            await asyncio.sleep(RENEW_EVERY)
            held = list(self._held.items())
            if not held:
                continue
            try:
                await asyncio.wait_for(self._renew(keys=[k for _, k in held], args=[LEASE, *(i for i, _ in held)]),
                                       TIMEOUT)
            except (asyncio.TimeoutError, *self.errors) as exc:
                log.warning("cannot renew %d in-flight leases on Redis (%s): they lapse after %.0f s",
                            len(held), type(exc).__name__, LEASE)

    async def close(self) -> None:
        if self._renewer is not None:
            self._renewer.cancel()
            await asyncio.gather(self._renewer, return_exceptions=True)
        await super().close()
        await self.redis.aclose()


class RedisStore:
    """`Store` (quota/policy) for one key in Redis."""

    def __init__(self, backend: RedisQuotas, name: str) -> None:
        self.backend = backend
        p = f"modelyard:q:{name}:"
        self.keys = [p + "req", p + "tok", p + "inflight", p + "tok:sum"]
        self.token_keys = [self.keys[1], self.keys[3]]
        self._budget_prefix = p + "budget:"
        self.seen = 0       # the budget counter as Redis last said (checked against while it is down)
        self.owed = 0       # tokens charged here while Redis was down, added by the next admission

    def owe(self, tokens: int) -> None:
        self.owed += tokens

    def _budget(self, limits: KeyLimits) -> tuple[str, int]:
        period = limits.budget_period or "day"
        start, end = period_bounds(period)
        return f"{self._budget_prefix}{period}:{start}", end

    async def admit(self, limits: KeyLimits) -> Slot | None | Refusal:
        lease_id = _uid()
        key, end = self._budget(limits)
        owed, self.owed = (self.owed if limits.budget else 0), 0
        try:
            out = await self.backend.admit_script(
                keys=[*self.keys, key],
                args=[limits.rpm, limits.tpm, lease_id, limits.max_parallel, LEASE, limits.budget, owed, end])
        except BaseException:
            self.owed += owed       # owed still (if it did reach Redis: counted twice, the safe side)
            raise
        if out[0] == 1:
            self.seen = int(out[1])
            return self.backend.hold(lease_id, self.keys[2]) if limits.max_parallel else None
        which, retry, used = out[1].decode(), float(out[2]), int(out[3])
        if which == "budget":
            self.seen = used
        return Refusal(which, retry_after=retry, used=used)

    async def reserve(self, limits: KeyLimits, tokens: int, check: bool) -> tuple[str, bool, str, int] | Refusal | None:
        charge_id = _uid()
        key, end = self._budget(limits)
        out = await self.backend.reserve_script(keys=[*self.token_keys, key],
                                                args=[limits.tpm, charge_id, tokens, int(check), limits.budget, end])
        if out[0] != 1:
            if out[1].decode() == "budget":
                self.seen = int(out[2])
            return Refusal(out[1].decode(), used=int(out[2]), tokens=tokens)
        if limits.budget:
            self.seen = int(out[1])
        return (charge_id, bool(limits.budget), key, end) if check else None

    async def settle(self, hold: tuple[str, bool, str, int], reserved: int, tokens: int) -> None:
        charge_id, budget, key, end = hold
        used = await self.backend.settle_script(keys=[*self.token_keys, key],
                                                args=[charge_id, reserved, tokens, int(budget), end])
        if budget:
            self.seen = int(used)

    def unsettled(self, hold: tuple[str, bool, str, int], reserved: int, tokens: int) -> None:
        if hold[1] and tokens > reserved:
            self.owe(tokens - reserved)


def _uid() -> str:
    return os.urandom(8).hex()
