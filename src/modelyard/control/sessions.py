"""Console sessions as server-side records (issue 19, item 11).

The cookie holds a random id (32 bytes); the `console_sessions` row holds only its sha256, a
digest naming the admin token it was opened with (`token_ref`) and its expiry. So a read of the
database, a backup or a copy of the file, yields no session: only the ids' digests are there,
and a digest is no cookie. A session ends when it expires, at logout (its row deleted), and when
its token is revoked (`AdminTokenStore.revoke` deletes the token's rows; a configured token taken
out of the config file matches no row's `token_ref` any more).

The alternative, keeping the signed cookies and the signing key outside the database (a file
or an environment variable), would have needed a secret shared by hand between every gateway,
and logout could still not end a copied cookie. Records need nothing shared beyond the database
the gateways use already, and make logout final.
"""

from __future__ import annotations

import hashlib
import secrets
import time

from .db import Database, Row
from .records import audit


def id_digest(session_id: str) -> str:
    return hashlib.sha256(session_id.encode()).hexdigest()


def token_ref(token_digest: bytes) -> str:
    """Names an admin token (by the sha256 of its secret) without being its digest: a row does
    not say which stored token's digest it belongs to, only equality can be tested."""
    return hashlib.sha256(b"modelyard console session|" + token_digest).hexdigest()


class SessionStore:
    def __init__(self, db: Database) -> None:
        self.db = db

    def create(self, ref: str, seconds: int, actor: str, detail: dict) -> tuple[str, int]:
        """A new session's id (for the cookie; only its digest is stored) and expiry; audited."""
        session_id = secrets.token_urlsafe(32)
        now = int(time.time())
        with self.db.transaction() as db:
            db.execute("DELETE FROM console_sessions WHERE expires_at <= ?", (now,))     # the sweep
            db.execute("INSERT INTO console_sessions (id_digest, token_ref, expires_at, created_at) "
                       "VALUES (?, ?, ?, ?)", (id_digest(session_id), ref, now + seconds, now))
            audit(db, actor, "console.login", actor, detail)
        return session_id, now + seconds

    def get(self, session_id: str) -> Row | None:
        rows = self.db.query("SELECT token_ref, expires_at FROM console_sessions WHERE id_digest = ? AND "
                             "expires_at > ?", (id_digest(session_id), int(time.time())))
        return rows[0] if rows else None

    def delete(self, session_id: str, actor: str, detail: dict) -> None:
        with self.db.transaction() as db:
            db.execute("DELETE FROM console_sessions WHERE id_digest = ?", (id_digest(session_id),))
            audit(db, actor, "console.logout", actor, detail)

    def failed(self, detail: dict) -> None:
        """A refused sign-in, audited (the client's address; nothing of what was typed)."""
        with self.db.transaction() as db:
            audit(db, "anonymous", "console.login_failed", "-", detail)


def end_sessions_of(db: Database, token_digest_hex: str) -> int:
    """Inside the transaction revoking a token: its console sessions end with it."""
    return db.execute("DELETE FROM console_sessions WHERE token_ref = ?", (token_ref(bytes.fromhex(token_digest_hex)),))
