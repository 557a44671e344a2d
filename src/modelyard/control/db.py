"""The control plane's database: one small interface, two backends, the same SQL.

SQLite is the embedded default (a file in the data directory, WAL, nothing to install);
PostgreSQL (`database_url = "postgresql://..."`) lets many gateway processes share one store.
SQL is written once with `?` placeholders and portable types (TEXT, BIGINT); the PostgreSQL
backend rewrites the placeholders. Calls are blocking and serialised per process: the control
plane is called by admin requests and a background poll, never by the request path, so callers
run them on a worker thread (asyncio.to_thread).

Versioned migrations (control/migrations.py) are applied at open, inside a transaction, by
whichever process gets there first.
"""

from __future__ import annotations

import os
import sqlite3
import threading
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator, Sequence

from ..errors import ConfigError
from .migrations import MIGRATIONS

Row = dict[str, Any]
CHANNEL = "modelyard_control"      # PostgreSQL NOTIFY channel: keys or endpoints changed


class Database:
    """A connection with a lock; `transaction()` groups statements atomically."""

    kind = "?"

    def __init__(self) -> None:
        self._lock = threading.RLock()

    def _cursor(self):
        raise NotImplementedError

    def _sql(self, sql: str) -> str:
        return sql

    def query(self, sql: str, params: Sequence[Any] = ()) -> list[Row]:
        with self._lock:
            cur = self._cursor()
            cur.execute(self._sql(sql), tuple(params))
            cols = [d[0] for d in cur.description or ()]
            return [dict(zip(cols, row)) for row in cur.fetchall()]

    def execute(self, sql: str, params: Sequence[Any] = ()) -> int:
        with self._lock:
            cur = self._cursor()
            cur.execute(self._sql(sql), tuple(params))
            return cur.rowcount

    @contextmanager
    def transaction(self) -> Iterator["Database"]:
        with self._lock:
            self._begin()
            try:
                yield self
            except BaseException:
                self._conn.rollback()
                raise
            self._conn.commit()

    def _begin(self) -> None:
        pass

    def migrate(self) -> int:
        """Apply what is missing; returns the schema version."""
        with self.transaction():
            # the lock first: two PostgreSQL sessions racing on CREATE TABLE IF NOT EXISTS can
            # both miss the table and one fails (unique violation on pg_type)
            self._lock_schema()
            self.execute("CREATE TABLE IF NOT EXISTS schema_version (version BIGINT NOT NULL)")
            applied = {r["version"] for r in self.query("SELECT version FROM schema_version")}
            for version, statements in sorted(MIGRATIONS):
                if version not in applied:      # a lower number merged later is applied too
                    for statement in statements:
                        self.execute(statement)
                    self.execute("INSERT INTO schema_version (version) VALUES (?)", (version,))
                    applied.add(version)
        return max(applied, default=0)

    def _lock_schema(self) -> None:
        pass

    def notify_change(self) -> None:
        """Inside a transaction that changed keys or endpoints: tell the other processes when it
        commits (PostgreSQL's NOTIFY; SQLite's readers see `data_version` move instead)."""

    def close(self) -> None:
        with self._lock:
            self._conn.close()


def private(path: Path) -> None:
    """The file (made if missing) and its -wal/-shm readable by this user only: they hold the
    digests of every key and token and the console's sessions. SQLite makes a -wal or -shm with
    its database's mode, so the database's own mode, set before the first connection, covers
    them; ones left by an older version are narrowed too."""
    os.close(os.open(path, os.O_RDWR | os.O_CREAT, 0o600))
    for each in (path, path.with_name(path.name + "-wal"), path.with_name(path.name + "-shm")):
        if each.exists():
            os.chmod(each, 0o600)


class SQLiteDatabase(Database):
    kind = "sqlite"

    def __init__(self, path: Path) -> None:
        super().__init__()
        path.parent.mkdir(parents=True, exist_ok=True)
        private(path)
        # isolation_level=None: we issue BEGIN ourselves (IMMEDIATE: take the write lock at once,
        # so two processes migrating or writing never deadlock on an upgrade from read to write)
        self._conn = sqlite3.connect(str(path), check_same_thread=False, isolation_level=None, timeout=10)
        self._conn.execute("PRAGMA journal_mode=WAL")
        self._conn.execute("PRAGMA busy_timeout=10000")
        self.path = path

    def _cursor(self):
        return self._conn.cursor()

    def _begin(self) -> None:
        self._conn.execute("BEGIN IMMEDIATE")

    def data_version(self) -> int:
        """Changes by other connections (other processes) bump it: a cheap "anything new?"."""
        with self._lock:
            return self._conn.execute("PRAGMA data_version").fetchone()[0]


class PostgresDatabase(Database):
    kind = "postgresql"

    def __init__(self, url: str) -> None:
        super().__init__()
        import psycopg
        self._url = url
        self._conn = psycopg.connect(url, autocommit=True)
        self._in_tx = False

    def _live(self):
        # a server restarted (or a network cut) breaks the connection for good: connect again,
        # so the control plane comes back with its database (control/sync stops failing closed)
        if self._conn.broken:
            import psycopg
            self._conn = psycopg.connect(self._url, autocommit=True, connect_timeout=10)
        return self._conn

    def _cursor(self):
        return self._live().cursor()

    def _sql(self, sql: str) -> str:
        return sql.replace("?", "%s")

    @contextmanager
    def transaction(self) -> Iterator["Database"]:
        with self._lock, self._live().transaction():
            yield self

    def notify_change(self) -> None:
        self.execute("SELECT pg_notify(?, '')", (CHANNEL,))

    def _lock_schema(self) -> None:
        # one migrating process at a time (held until the transaction ends)
        self.execute("SELECT pg_advisory_xact_lock(?)", (0x6D6F64656C,))


def open_database(url: str) -> Database:
    """`sqlite:///absolute/path.db` (or a plain path) or `postgresql://...`; migrated."""
    if url.startswith(("postgresql://", "postgres://")):
        db: Database = PostgresDatabase(url)
    elif url.startswith("sqlite:///"):
        db = SQLiteDatabase(Path(url[len("sqlite:///"):]).expanduser())
    elif "://" in url:
        raise ConfigError(f"database_url must be sqlite:///path or postgresql://..., got a {url.split('://')[0]} URL")
    else:
        db = SQLiteDatabase(Path(url).expanduser())
    db.migrate()
    return db
