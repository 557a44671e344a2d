"""Wakes this process's sync loop as soon as another process changed the control store, so a
revoked key or a changed endpoint applies in well under the poll interval:

- PostgreSQL: writers `NOTIFY modelyard_control` inside their transaction (delivered at commit);
  a thread here LISTENs on its own connection and wakes the loop. If that connection breaks it
  reconnects with a backoff, and the poll goes on meanwhile (the bound stays POLL).
- SQLite: `PRAGMA data_version` moves when another connection commits; it is read every
  SQLITE_PEEK seconds (one cheap statement, no table read).
The poll stays as the fallback either way: `wait(timeout)` returns on a change or at the timeout.
"""

from __future__ import annotations

import asyncio
import logging
import threading

from .db import CHANNEL, Database, PostgresDatabase, SQLiteDatabase

log = logging.getLogger("modelyard.control")
SQLITE_PEEK = 0.2           # seconds between looks at SQLite's data_version
LISTEN_TIMEOUT = 1.0        # seconds the listener blocks before it checks whether to stop


class ChangeFeed:
    def __init__(self, db: Database, url: str | None = None) -> None:
        self.db, self.url = db, url
        self._event = asyncio.Event()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._peek: asyncio.Task | None = None
        self.notifications = 0          # wake-ups from other processes' changes (tests, metrics)

    async def wait(self, timeout: float) -> None:
        try:
            await asyncio.wait_for(self._event.wait(), timeout)
        except asyncio.TimeoutError:
            pass
        self._event.clear()

    def _wake(self) -> None:
        self.notifications += 1
        self._event.set()

    def start(self) -> None:
        self._loop = asyncio.get_running_loop()
        if isinstance(self.db, PostgresDatabase) and self.url:
            self._thread = threading.Thread(target=self._listen, name="control-listen", daemon=True)
            self._thread.start()
        elif isinstance(self.db, SQLiteDatabase):
            self._peek = asyncio.create_task(self._peek_sqlite(), name="control-data-version")

    async def _peek_sqlite(self) -> None:
        last = await asyncio.to_thread(self.db.data_version)
        while True:
            await asyncio.sleep(SQLITE_PEEK)
            try:
                now = await asyncio.to_thread(self.db.data_version)
            except Exception:  # noqa: BLE001 - the poll still runs
                continue
            if now != last:
                last = now
                self._wake()

    def _listen(self) -> None:
        import psycopg
        backoff = 0.5
        while not self._stop.is_set():
            try:
                with psycopg.connect(self.url, autocommit=True) as conn:
                    conn.execute(f"LISTEN {CHANNEL}")
                    backoff = 0.5
                    while not self._stop.is_set():
                        for _ in conn.notifies(timeout=LISTEN_TIMEOUT):
                            assert self._loop is not None
                            self._loop.call_soon_threadsafe(self._wake)
            except Exception as exc:  # noqa: BLE001 - keep listening; the poll covers the gap
                log.warning("control store LISTEN connection lost (%s); the 1 s poll covers it; retrying",
                            type(exc).__name__)
                self._stop.wait(backoff)
                backoff = min(backoff * 2, 10.0)

    async def stop(self) -> None:
        self._stop.set()
        if self._peek is not None:
            self._peek.cancel()
            await asyncio.gather(self._peek, return_exceptions=True)
        if self._thread is not None:
            await asyncio.to_thread(self._thread.join, LISTEN_TIMEOUT + 1)
