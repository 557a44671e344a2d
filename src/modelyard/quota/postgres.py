"""Counting a key's quota through PostgreSQL alone (`[quota] backend = "postgres"`, on
`database_url`): leases of quota BLOCKS, never a hot-row update per request. The policy (limits,
429s, the fallback) is quota/policy's.

A process that needs a request (or tokens) of a key and has none left leases a block from the
`quota_blocks` table (created by `prepare`; this backend needs nothing else of the control
plane's schema) in one short transaction under the key's advisory lock: the blocks leased for that
key in the last WINDOW seconds (the database's clock) are summed, and a block of
min(B, limit - sum) is inserted, or none (429, Retry-After: when the oldest block leaves the
window). The process then spends the block locally, on the request path, without the database,
for at most BLOCK_LIFE seconds after its lease; what is left then is dropped (never handed back:
counting it spent is the safe side). Refusals are remembered until Retry-After, so a key at its
limit costs no database call per request either.

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
leases a new one only when its block is empty or expired, one lease per key and kind at a time):
at most one block of B per process. Unspent blocks only ever lower what is admitted (by at most
processes * B in a window). A process killed with a block costs the key at most that block's
unspent part, until it leaves the window (60 s after its lease); no lock outlives it (the advisory
lock is a transaction's, and PostgreSQL ends the transaction of a connection that died). A
request that used more than it reserved takes the overage from the block, the rest leased
unchecked (as a remote engine's after-the-fact charge is).

max_parallel is not shared through the database (a row per request in flight is what this backend
avoids): each process allows max_parallel // processes (at least 1), as in the fallback. The
budget is counted as in memory (quota/memory.LocalBudget: the usage table through
control/budget.BudgetBook, plus this process's reservations; its bound across processes is there).

Off the event loop: psycopg's AsyncConnection, one per process (not the control store's: a lease
never waits behind a usage flush), server-side lock_timeout and statement_timeout TIMEOUT, and the
policy's bound (BOUND, connecting included) on every call. A lease runs as a task of its own that
the policy's timeout does not cancel: psycopg answers a cancelled query by asking the server to
cancel it and waiting up to 10 s, which a hung server never answers. A lease still running when its
caller gave up makes every lease fail at once (the fallback) until it has ended, and its
connection is closed then; so a hung database costs one stuck connection, not one per request.
"""

from __future__ import annotations

import asyncio
import os
import time

from .limits import WINDOW, KeyLimits, Refusal, Slot, share
from .memory import InFlight, LocalBudget, MemoryStore, book_used
from .policy import Backend, KeyQuota, Store

BLOCKS = 4            # blocks per limit per process: B = limit // (BLOCKS * processes)
BLOCK_LIFE = 10.0     # seconds a leased block may be spent
TIMEOUT = 0.25        # seconds for the advisory lock or one statement, in the server
BOUND = 1.0           # seconds for one lease, connecting included, before this process falls back

DDL = ("""CREATE TABLE IF NOT EXISTS quota_blocks (
            id TEXT PRIMARY KEY,
            ident TEXT NOT NULL,
            kind TEXT NOT NULL,
            amount BIGINT NOT NULL,
            leased_at DOUBLE PRECISION NOT NULL
        )""",
       # `ident` is a digest of the key's stable identity, never the secret; leased_at is the
       # database's clock (unix seconds, fractional)
       "CREATE INDEX IF NOT EXISTS quota_blocks_window ON quota_blocks (ident, kind, leased_at)")


class PostgresQuotas(Backend):
    """The leasing connection and the leases still running after their caller gave up."""

    name = "PostgreSQL"
    timeout = BOUND

    def __init__(self, url: str, processes: int) -> None:
        import psycopg
        super().__init__(processes)
        self.errors = (psycopg.Error, OSError)   # unreachable, too slow (lock/statement timeout), or failing
        self.url = url
        self._conn = None
        self._lock: asyncio.Lock | None = None
        self._stuck: set[asyncio.Task] = set()
        self.leases = 0               # blocks leased by this process (a counter for tests)

    def stores(self, quota: KeyQuota, name: str) -> tuple[Store, Store | None]:
        budget, inflight = LocalBudget(book_used(quota)), InFlight()
        return BlockStore(self, name, budget, inflight), MemoryStore(budget, inflight)

    def block(self, limit: int) -> int:
        return max(1, limit // (BLOCKS * self.processes))

    async def prepare(self) -> None:
        """At start, before any request: the table, for a gateway without the control plane too."""
        import psycopg
        async with await psycopg.AsyncConnection.connect(self.url, autocommit=True, connect_timeout=5) as conn:
            for statement in DDL:
                await conn.execute(statement)

    async def _connection(self):
        if self._conn is None or self._conn.closed:
            import psycopg
            self._conn = await psycopg.AsyncConnection.connect(self.url, autocommit=True, connect_timeout=2)
            ms = int(TIMEOUT * 1000)
            await self._conn.execute(f"SET lock_timeout = {ms}")
            await self._conn.execute(f"SET statement_timeout = {ms}")
        return self._conn

    async def lease(self, ident: str, kind: str, want: int, need: int, limit: int, check: bool = True) -> int | Refusal:
        """A block of up to `want` (at least `need`) of `kind` for the key, or a Refusal."""
        if self._stuck:
            raise asyncio.TimeoutError("an earlier lease has not ended")
        if self._lock is None:
            self._lock = asyncio.Lock()
        async with self._lock:
            task = asyncio.ensure_future(self._lease(ident, kind, want, need, limit, check))
            try:
                return await asyncio.shield(task)
            except asyncio.CancelledError:
                if not task.done():         # the connection is its until it ends
                    self._stuck.add(task)
                    conn, self._conn = self._conn, None
                    task.add_done_callback(lambda t: self._unstuck(t, conn))
                raise

    def _unstuck(self, task: asyncio.Task, conn) -> None:
        self._stuck.discard(task)
        if not task.cancelled():
            task.exception()          # retrieved: it was given up on
        if conn is not None:
            self.background.spawn(conn.close())

    async def _lease(self, ident: str, kind: str, want: int, need: int, limit: int, check: bool) -> int | Refusal:
        lock = int(ident[:15], 16)
        try:
            conn = await self._connection()
            # BEGIN/COMMIT by hand: a failed transaction's connection is closed, never rolled back
            # (a rollback would wait on a server that may not answer; a closed connection's
            # transaction, and advisory lock, end in the server)
            await conn.execute("BEGIN")
            await conn.execute("SELECT pg_advisory_xact_lock(%s)", (lock,))
            now = float((await (await conn.execute("SELECT EXTRACT(EPOCH FROM clock_timestamp())")).fetchone())[0])
            await conn.execute("DELETE FROM quota_blocks WHERE ident = %s AND kind = %s AND leased_at <= %s",
                               (ident, kind, now - WINDOW))
            used, oldest = await (await conn.execute("SELECT COALESCE(SUM(amount), 0), MIN(leased_at) FROM "
                                                     "quota_blocks WHERE ident = %s AND kind = %s",
                                                     (ident, kind))).fetchone()
            used = int(used)
            grant = min(want, limit - used) if check else need
            if grant < need:
                await conn.execute("COMMIT")
                return Refusal(kind, retry_after=float(oldest) + WINDOW - now if oldest is not None else WINDOW,
                               used=used)
            await conn.execute("INSERT INTO quota_blocks (id, ident, kind, amount, leased_at) VALUES "
                               "(%s, %s, %s, %s, %s)", (os.urandom(8).hex(), ident, kind, grant, now))
            await conn.execute("COMMIT")
        except self.errors:
            conn, self._conn = self._conn, None
            if conn is not None:
                await conn.close()
            raise
        self.leases += 1
        return grant

    async def close(self) -> None:
        await super().close()
        conn, self._conn = self._conn, None
        if conn is not None:
            await conn.close()


class _Pot:
    """What is left of the block this process holds for one key and kind."""

    __slots__ = ("left", "until", "gen")

    def __init__(self) -> None:
        self.left, self.until, self.gen = 0, 0.0, 0

    def live(self, now: float) -> bool:
        return now < self.until

    def fill(self, amount: int, now: float) -> None:
        self.left, self.until, self.gen = amount, now + BLOCK_LIFE, self.gen + 1


class _Hold:
    """A reservation's tokens: the block they came from (its generation) and the budget held."""

    __slots__ = ("gen", "budget")

    def __init__(self, gen: int, budget: int) -> None:
        self.gen, self.budget = gen, budget


class BlockStore:
    """`Store` (quota/policy) over leased blocks; its budget and in-flight count are shared with
    the key's fallback store (one count of this process's requests, whichever store admitted them)."""

    def __init__(self, backend: PostgresQuotas, ident: str, budget: LocalBudget, inflight: InFlight) -> None:
        self.backend, self._ident = backend, ident
        self.budget, self.inflight = budget, inflight
        self._pots = {"req": _Pot(), "tok": _Pot()}
        self._leasing = {"req": asyncio.Lock(), "tok": asyncio.Lock()}   # one lease per key and kind at a time
        self._full: dict[str, tuple[float, int]] = {}    # kind -> (refused until, used): no call meanwhile

    def _from_pot(self, kind: str, amount: int) -> bool:
        pot = self._pots[kind]
        if pot.live(time.monotonic()) and pot.left >= amount:
            pot.left -= amount
            return True
        return False

    async def _take(self, kind: str, amount: int, limit: int) -> bool:
        """`amount` from the pot, leasing a new block when it cannot give it; False: refused
        (and remembered until the window frees up)."""
        if self._from_pot(kind, amount):
            return True
        full = self._full.get(kind)
        if full is not None and time.monotonic() < full[0]:
            return False
        async with self._leasing[kind]:
            if self._from_pot(kind, amount):     # another request leased one meanwhile
                return True
            need = max(amount, 1)                # room for one at least, even when only asking whether there is
            out = await self.backend.lease(self._ident, kind, max(self.backend.block(limit), need), need, limit)
            now = time.monotonic()
            if isinstance(out, Refusal):
                self._full[kind] = (now + max(out.retry_after, 0.0), out.used)
                return False
            self._full.pop(kind, None)
            self._pots[kind].fill(out - amount, now)      # the old block's rest is dropped: one live block per key
            return True

    def _refused(self, kind: str, tokens: int | None = None) -> Refusal:
        until, used = self._full.get(kind, (time.monotonic() + WINDOW, 0))
        return Refusal(kind, retry_after=max(until - time.monotonic(), 0.0), used=used, tokens=tokens)

    async def admit(self, limits: KeyLimits) -> Slot | None | Refusal:
        parallel = share(limits.max_parallel, self.backend.processes)
        if parallel and self.inflight.count >= parallel:
            return Refusal("parallel")
        if (no := self.budget.exhausted(limits)) is not None:
            return no
        tok = self._pots["tok"]
        if limits.tpm and not (tok.live(time.monotonic()) and tok.left > 0) and \
                not await self._take("tok", 0, limits.tpm):
            return _as("tpm", self._refused("tok"))
        if limits.rpm and not await self._take("req", 1, limits.rpm):
            return _as("rpm", self._refused("req"))
        return self.inflight.take(parallel)

    async def reserve(self, limits: KeyLimits, tokens: int, check: bool) -> _Hold | Refusal | None:
        if not check:
            self.budget.charge(tokens)
            if limits.tpm:
                await self._spend(tokens)
            return None
        held = self.budget.reserve(limits, tokens)
        if isinstance(held, Refusal):
            return held
        if not limits.tpm:
            return _Hold(-1, held)
        try:
            ok = await self._take("tok", tokens, limits.tpm)
        except BaseException:
            self.budget.settle(held, 0)      # the fallback reserves it again
            raise
        if not ok:
            self.budget.settle(held, 0)
            return _as("tpm", self._refused("tok", tokens))
        return _Hold(self._pots["tok"].gen, held)

    async def settle(self, hold: _Hold, reserved: int, tokens: int) -> None:
        over = self._settle_here(hold, reserved, tokens)
        if over:
            await self._spend(over)

    def unsettled(self, hold: _Hold, reserved: int, tokens: int) -> None:
        self._settle_here(hold, reserved, tokens)    # an overage past the block is not charged in the window

    def _settle_here(self, hold: _Hold, reserved: int, tokens: int) -> int:
        """The budget let go and the tokens' block corrected, without the database, once; what
        is left of an overage to lease."""
        if hold.budget >= 0:
            self.budget.settle(hold.budget, tokens)
            hold.budget = -1
        pot = self._pots["tok"]
        if hold.gen < 0:
            return 0
        live = hold.gen == pot.gen and pot.live(time.monotonic())
        hold.gen = -1
        if tokens <= reserved:
            if live:
                pot.left += reserved - tokens      # unused, back to the block it came from
            return 0
        take = min(pot.left, tokens - reserved) if live else 0
        pot.left -= take
        return tokens - reserved - take

    async def _spend(self, tokens: int) -> None:
        """After the fact: from the block, the rest leased unchecked."""
        if tokens <= 0:
            return
        take = min(self._pots["tok"].left, tokens) if self._pots["tok"].live(time.monotonic()) else 0
        self._pots["tok"].left -= take
        if tokens > take:
            await self.backend.lease(self._ident, "tok", tokens - take, tokens - take, 0, check=False)


def _as(kind: str, refusal: Refusal) -> Refusal:
    """A block's refusal ("req", "tok") as the limit's ("rpm", "tpm")."""
    return Refusal(kind, refusal.retry_after, refusal.used, refusal.reserved, refusal.tokens)
