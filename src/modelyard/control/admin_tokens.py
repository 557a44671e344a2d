"""Admin tokens kept in the control database, made by `modelyard admin create-token`, so the
control plane can be bootstrapped without putting a token in a config file.

The token is printed once by the command; the database keeps its sha256 digest and a short
prefix to recognise it by. `StoredAdmins` is a server's view of the active ones, refreshed by the
keys' poll (control/sync): a token revoked by the command stops working within 2 s. `any_active`
answers at start, without creating anything, whether a database holds one (then the server turns
its control plane on).
"""

from __future__ import annotations

import secrets
import sqlite3
import time
from pathlib import Path

from ..errors import ConfigError, Conflict, ObjectNotFound
from ..redact import mask_url_credentials
from ..settings import ADMIN_ROLES, AdminToken
from .db import Database
from .keys import digest
from .records import audit, new_id
from .sessions import end_sessions_of

TOKEN_PREFIX = "my-admin-"
SHOWN = len(TOKEN_PREFIX) + 4        # characters of the token kept to recognise it by
ACTIVE = "SELECT 1 FROM admin_tokens WHERE revoked_at IS NULL LIMIT 1"


def _public(row: dict) -> dict:
    return {"id": row["id"], "name": row["name"], "role": row["role"], "prefix": row["prefix"],
            "created_at": row["created_at"], "revoked_at": row["revoked_at"]}


class AdminTokenStore:
    def __init__(self, db: Database) -> None:
        self.db = db

    def create(self, actor: str, name: str, role: str = "admin") -> tuple[dict, str]:
        """A new token (returned once, with its record); names are unique among active tokens."""
        if role not in ADMIN_ROLES:
            raise ConfigError(f"role must be one of {ADMIN_ROLES}, got {role!r}")
        if not name or len(name) > 100:
            raise ConfigError(f"a token's name must be 1 to 100 characters, got {len(name)}")
        token = TOKEN_PREFIX + secrets.token_urlsafe(32)
        token_id = new_id("admtok")
        with self.db.transaction() as db:
            if db.query("SELECT id FROM admin_tokens WHERE name = ? AND revoked_at IS NULL", (name,)):
                raise Conflict(f"an active admin token is named {name!r} already; revoke it or pick another name")
            db.execute("INSERT INTO admin_tokens (id, name, role, prefix, digest, created_at, revoked_at) "
                       "VALUES (?, ?, ?, ?, ?, ?, NULL)",
                       (token_id, name, role, token[:SHOWN], digest(token), int(time.time())))
            audit(db, actor, "admin_token.create", token_id, {"name": name, "role": role})
            db.notify_change()
        return self._get(token_id), token

    def list(self) -> list[dict]:
        """The active tokens, oldest first."""
        rows = self.db.query("SELECT * FROM admin_tokens WHERE revoked_at IS NULL ORDER BY id")
        return [_public(r) for r in rows]

    def revoke(self, actor: str, name: str) -> dict:
        with self.db.transaction() as db:
            rows = db.query("SELECT id, digest FROM admin_tokens WHERE name = ? AND revoked_at IS NULL", (name,))
            if not rows:
                raise ObjectNotFound(f"no active admin token named {name!r}", param="name")
            db.execute("UPDATE admin_tokens SET revoked_at = ? WHERE id = ?", (int(time.time()), rows[0]["id"]))
            end_sessions_of(db, rows[0]["digest"])      # its console sessions end now, everywhere
            audit(db, actor, "admin_token.revoke", rows[0]["id"], {"name": name})
            db.notify_change()
        return self._get(rows[0]["id"])

    def active(self) -> tuple[AdminToken, ...]:
        rows = self.db.query("SELECT name, role, digest FROM admin_tokens WHERE revoked_at IS NULL ORDER BY id")
        return tuple(AdminToken(r["name"], f"sha256:{r['digest']}", r["role"]) for r in rows)

    def _get(self, token_id: str) -> dict:
        return _public(self.db.query("SELECT * FROM admin_tokens WHERE id = ?", (token_id,))[0])


class StoredAdmins:
    """This process's copy of the active stored tokens (api/admin/auth.caller reads `tokens`)."""

    def __init__(self, store: AdminTokenStore) -> None:
        self.store = store
        self.tokens: tuple[AdminToken, ...] = ()

    def refresh(self) -> None:
        self.tokens = self.store.active()      # one assignment: a request sees the old set or the new one


def any_active(url: str) -> bool:
    """Whether the control database at `url` holds an active admin token. Creates nothing: a
    SQLite file that is not there means no; a PostgreSQL server that does not answer is a
    ConfigError (which tokens are valid cannot be known, so the server does not start)."""
    if url.startswith(("postgresql://", "postgres://")):
        import psycopg
        try:
            with psycopg.connect(url, connect_timeout=10) as conn:
                return bool(conn.execute(ACTIVE).fetchall())
        except psycopg.errors.UndefinedTable:
            return False           # a database no modelyard has migrated to version 6 yet
        except psycopg.OperationalError as exc:
            raise ConfigError(f"the control database (database_url) does not answer: {mask_url_credentials(str(exc))}") from None
    path = Path(url[len("sqlite:///"):] if url.startswith("sqlite:///") else url).expanduser()
    if not path.is_file():
        return False
    conn = sqlite3.connect(f"file:{path}?mode=ro", uri=True, timeout=10)
    try:
        return bool(conn.execute(ACTIVE).fetchall())
    except sqlite3.OperationalError:       # no admin_tokens table yet
        return False
    finally:
        conn.close()
