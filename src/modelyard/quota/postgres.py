"""Per-key quotas shared by gateway processes through PostgreSQL alone (`[quota] backend =
"postgres"`, on `database_url`): leases of quota BLOCKS, never a hot-row update per request.

A process that needs a request (or tokens) of a key and has none left leases a block from the
`quota_blocks` table (migration 4) in one short transaction under the key's advisory lock: the
blocks leased for that key in the last WINDOW seconds (the database's clock) are summed, and a
block of min(B, limit - sum) is inserted, or none (429, Retry-After: when the oldest block leaves
the window). The process then spends the block locally, on the request path, without the
database, for at most BLOCK_LIFE seconds after its lease; what is left then is dropped (never
handed back: counting it spent is the safe side). Refusals are remembered until Retry-After, so
a key at its limit costs no database call per request either.

    B  = max(1, rpm // (BLOCKS * processes))         requests per block
    Bt = max(1, tpm // (BLOCKS * processes))         tokens per block (a reservation larger than
                                                     Bt leases a block of its own size)

Overshoot bound (rpm; tpm alike, with B_t = max(Bt, the largest reservation)): in any WINDOW
(60 s) interval [t, t + 60), the requests admitted are at most

    rpm + processes * B

because (1) the blocks leased in [t, t + 60) sum to at most rpm: each lease is granted under the
key's lock only if the blocks leased in the 60 s before it, itself included, fit in rpm, and the
last lease in the interval sees every other one of it; and (2) blocks leased before t can be spent
in the interval only if still live at t, and a process holds at most one live block per key (it
leases a new one only when its block is empty or expired): at most one block of B per process.
Unspent blocks only ever lower what is admitted (by at most processes * B in a window). A process
killed with a block costs the key at most that block's unspent part, until it leaves the window
(60 s after its lease); no lock outlives it (the advisory lock is a transaction's, and PostgreSQL
ends the transaction of a connection that died).

max_parallel is not shared through the database (a row per request in flight is what this backend
avoids): each process allows max_parallel // processes (at least 1), like Redis's fallback.
Budgets are read from the usage table (control/budget.BudgetBook). The lease runs on the event
loop (one connection per process, lock_timeout and statement_timeout TIMEOUT); if the database
cannot be reached or is slower than that, this process falls back to quota / processes in memory,
logs it and sets `modelyard_quota_fallback`, and tries the database again every RETRY seconds.
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
from .limits import Slot, budget_exceeded, parallel_exceeded

log = logging.getLogger("modelyard.quota")
BLOCKS = 4            # blocks per limit per process: B = limit // (BLOCKS * processes)
BLOCK_LIFE = 10.0     # seconds a leased block may be spent
TIMEOUT = 0.25        # seconds for one lease before this process falls back
RETRY = 1.0


class Refused(Exception):
    def __init__(self, used: int, retry_after: float) -> None:
        self.used, self.retry_after = used, retry_after


class PostgresQuotas:
    """One connection for leases (not the control store's: a lease never waits behind a usage
    flush), whether this process is on its local fallback, and the counters /metrics shows."""

    def __init__(self, url: str, processes: int) -> None:
        import psycopg
        self._errors = (psycopg.Error,)     # unreachable, too slow (lock/statement timeout), or failing
        self.url, self.processes = url, max(1, processes)
        self._conn = None
        self._lock = threading.Lock()
        self.fallback = False
        self._down_since = 0.0
        self.fallbacks = 0
        self.leases = 0               # blocks leased by this process (a counter for tests)

    def prepare(self) -> None:
        """At start, before any request: the schema (quota_blocks) migrated, for a gateway
        without the control plane too."""
        from ..control.db import open_database
        open_database(self.url).close()

    def quota(self, rpm: int, tpm: int, ident: bytes) -> "BlockQuota":
        return BlockQuota(self, rpm, tpm, ident)

    def block(self, limit: int) -> int:
        return max(1, limit // (BLOCKS * self.processes))

    def _connection(self):
        if self._conn is None or self._conn.closed:
            import psycopg
            self._conn = psycopg.connect(self.url, autocommit=True, connect_timeout=2)
            ms = int(TIMEOUT * 1000)
            self._conn.execute(f"SET lock_timeout = {ms}")
            self._conn.execute(f"SET statement_timeout = {ms}")
        return self._conn

    def lease(self, ident: str, kind: str, want: int, need: int, limit: int, check: bool = True) -> int:
        """A block of up to `want` (at least `need`) of `kind` for the key, or Refused."""
        lock = int(ident[:15], 16)
        with self._lock:
            conn = self._connection()
            with conn.transaction():
                conn.execute("SELECT pg_advisory_xact_lock(%s)", (lock,))
                now = float(conn.execute("SELECT EXTRACT(EPOCH FROM clock_timestamp())").fetchone()[0])
                conn.execute("DELETE FROM quota_blocks WHERE ident = %s AND kind = %s AND leased_at <= %s",
                             (ident, kind, now - WINDOW))
                used, oldest = conn.execute("SELECT COALESCE(SUM(amount), 0), MIN(leased_at) FROM quota_blocks "
                                            "WHERE ident = %s AND kind = %s", (ident, kind)).fetchone()
                used = int(used)
                grant = min(want, limit - used) if check else need
                if grant < need:
                    raise Refused(used, float(oldest) + WINDOW - now if oldest is not None else WINDOW)
                conn.execute("INSERT INTO quota_blocks (id, ident, kind, amount, leased_at) VALUES (%s, %s, %s, %s, %s)",
                             (os.urandom(8).hex(), ident, kind, grant, now))
        self.leases += 1
        return grant

    def call(self, work: Callable[[], object], local: Callable[[], object]):
        """`work()` on the database, or `local()` while it is unreachable."""
        now = time.monotonic()
        if self.fallback and now - self._down_since < RETRY:
            return local()
        try:
            out = work()
        except self._errors as exc:
            with self._lock:
                if self._conn is not None:
                    self._conn.close()
                    self._conn = None
            if not self.fallback:
                log.error("PostgreSQL unreachable for quotas (%s): each key gets 1/%d of its quota in this "
                          "process until it answers", type(exc).__name__, self.processes)
                self.fallbacks += 1
            self.fallback, self._down_since = True, now
            return local()
        if self.fallback:
            log.warning("PostgreSQL answers again: quotas are shared across processes again")
            self.fallback = False
        return out

    def close(self) -> None:
        with self._lock:
            if self._conn is not None:
                self._conn.close()
                self._conn = None


class _Pot:
    """What is left of the block this process holds for one key and kind."""

    __slots__ = ("left", "until", "gen")

    def __init__(self) -> None:
        self.left, self.until, self.gen = 0, 0.0, 0

    def live(self, now: float) -> bool:
        return now < self.until

    def fill(self, amount: int, now: float) -> None:
        self.left, self.until, self.gen = amount, now + BLOCK_LIFE, self.gen + 1


class BlockCharge(Charge):
    __slots__ = ("gen", "local")

    def __init__(self, at: float, tokens: int, gen: int, local: Charge | None = None) -> None:
        super().__init__(at, tokens)
        self.gen, self.local = gen, local


class BlockQuota(Quota):
    """Quota's interface over leased blocks; its own windows (limit / processes) are the fallback."""

    def __init__(self, backend: PostgresQuotas, rpm: int, tpm: int, ident: bytes) -> None:
        super().__init__(rpm, tpm)
        self.backend = backend
        self._ident = hashlib.sha256(b"modelyard-quota:" + ident).hexdigest()[:24]   # never the secret
        self._req, self._tok = _Pot(), _Pot()
        self._full: dict[str, tuple[float, int]] = {}    # kind -> (refused until, used): no call meanwhile
        self._local = Quota(self._share(rpm), self._share(tpm))

    def _share(self, limit: int) -> int:
        return max(1, limit // self.backend.processes) if limit else 0

    def _sync_local(self) -> None:
        self._local.rpm, self._local.tpm = self._share(self.rpm), self._share(self.tpm)

    def _take(self, kind: str, pot: _Pot, amount: int, limit: int, now: float, check: bool = True) -> bool:
        """`amount` from the pot, leasing a new block when it cannot give it; False: refused
        (and remembered until the window frees up)."""
        if pot.live(now) and pot.left >= amount:
            pot.left -= amount
            return True
        full = self._full.get(kind)
        if check and full is not None and now < full[0]:
            return False
        block = self.backend.block(limit) if check else amount
        need = max(amount, 1)              # room for one at least, even when only asking whether there is
        try:
            grant = self.backend.lease(self._ident, kind, max(block, need), need, limit, check)
        except Refused as no:
            self._full[kind] = (now + max(no.retry_after, 0.0), no.used)
            return False
        self._full.pop(kind, None)
        pot.fill(grant - amount, now)      # the old block's rest is dropped: one live block per key
        return True

    def _retry(self, kind: str, now: float) -> float:
        return max(self._full.get(kind, (now + WINDOW, 0))[0] - now, 0.0)

    def admit(self, now: float) -> Slot:
        self._sync_local()
        limit = self._share(self.max_parallel) if self.max_parallel else 0
        if limit and self.in_flight >= limit:
            raise parallel_exceeded(self.max_parallel)
        if self.budget_tokens and self.budget_period and self.book is not None:
            used = self.book.used(self.key_id, self.budget_period)
            if used >= self.budget_tokens:
                raise budget_exceeded(self.budget_tokens, self.budget_period, used)

        def shared() -> None:
            if self.tpm and not (self._tok.live(now) and self._tok.left > 0) and \
                    not self._take("tok", self._tok, 0, self.tpm, now):
                raise RateLimited(f"rate limit: {self.tpm} tokens per minute for this key "
                                  f"({self._full['tok'][1]} used in the last minute)",
                                  code="rate_limit_exceeded", retry_after=self._retry("tok", now))
            if self.rpm and not self._take("req", self._req, 1, self.rpm, now):
                raise RateLimited(f"rate limit: {self.rpm} requests per minute for this key",
                                  code="rate_limit_exceeded", retry_after=self._retry("req", now))

        def local() -> None:
            self._local.admit(now).release()       # counted in the local window; slots are ours below
        self.backend.call(shared, local)
        self.in_flight += 1
        return Slot(self._release)

    def reserve(self, tokens: int, now: float) -> Charge:
        if not self.tpm:
            return BlockCharge(now, tokens, -1)
        self._sync_local()

        def shared() -> Charge:
            if not self._take("tok", self._tok, tokens, self.tpm, now):
                used = self._full["tok"][1]
                why = (f"rate limit: {self.tpm} tokens per minute for this key ({used} used in the last minute); "
                       f"this request may use up to {tokens} tokens (prompt + max_tokens)")
                if tokens > self.tpm:
                    raise RateLimited(why + ", more than the whole quota; lower max_tokens or shorten the prompt",
                                      code="rate_limit_exceeded", retry_after=WINDOW)
                raise RateLimited(why, code="rate_limit_exceeded", retry_after=self._retry("tok", now))
            return BlockCharge(now, tokens, self._tok.gen)
        return self.backend.call(shared, lambda: BlockCharge(now, tokens, -1, self._local.reserve(tokens, now)))

    def settle(self, charge: Charge, tokens: int) -> None:
        if charge.settled:
            return
        charge.settled = True
        if isinstance(charge, BlockCharge) and charge.local is not None:
            self._local.settle(charge.local, tokens)
        elif isinstance(charge, BlockCharge) and charge.gen == self._tok.gen and self._tok.live(time.monotonic()):
            self._tok.left += max(charge.tokens - tokens, 0)     # unused, back to the block it came from

    def spend(self, tokens: int, now: float) -> None:
        """After the fact (a remote engine): from the block, the rest leased unchecked."""
        if not self.tpm or tokens <= 0:
            return
        take = min(self._tok.left, tokens) if self._tok.live(now) else 0
        self._tok.left -= take
        if tokens > take:
            self.backend.call(lambda: self._take("tok", _Pot(), tokens - take, self.tpm, now, check=False),
                              lambda: self._local.spend(tokens - take, now))
