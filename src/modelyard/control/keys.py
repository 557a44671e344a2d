"""Inference API keys managed at run time: created, listed, limited, revoked; every change audited.

The secret exists once, in the answer to the create call: the store keeps its sha256 digest and a
short prefix to recognise it by, and nothing that leaves the process (responses, logs, the audit
log) ever holds the secret again. Each key has a `revision`, the ETag of optimistic concurrency:
a PATCH with a stale If-Match is refused (412), so two admins never overwrite each other unseen.
"""

from __future__ import annotations

import hashlib
import json
import secrets
import time
from dataclasses import dataclass
from typing import Any

from ..errors import Conflict, ObjectNotFound, PreconditionFailed
from .db import Database, Row
from .records import audit as write_audit, new_id, page

SECRET_PREFIX = "sk-my-"
SHOWN = len(SECRET_PREFIX) + 4          # characters of the secret kept to recognise it by
LIMIT_FIELDS = ("rpm", "tpm", "endpoints", "expires_at", "name", "max_parallel", "budget_tokens", "budget_period")


def digest(secret: str) -> str:
    return hashlib.sha256(secret.encode()).hexdigest()


@dataclass(frozen=True)
class ActiveKey:
    """What the request path needs of a stored key (control/sync keeps these in memory)."""
    id: str
    digest: bytes
    rpm: int
    tpm: int
    endpoints: frozenset[str] | None
    expires_at: int | None
    previous: bytes | None = None        # the digest before the last rotation, valid until:
    previous_until: int | None = None
    max_parallel: int = 0                # requests in flight at once (0: no limit)
    budget_tokens: int = 0               # tokens per budget_period (0: no budget)
    budget_period: str | None = None     # "day" | "month" (UTC calendar)


def public(row: Row) -> dict[str, Any]:
    """A key as the admin API shows it: never the secret or its digest."""
    return {"id": row["id"], "object": "api_key", "name": row["name"], "prefix": row["prefix"],
            "rpm": row["rpm"], "tpm": row["tpm"], "max_parallel": row["max_parallel"],
            "budget_tokens": row["budget_tokens"], "budget_period": row["budget_period"],
            "endpoints": json.loads(row["endpoints"]) if row["endpoints"] is not None else None,
            "expires_at": row["expires_at"], "created_at": row["created_at"], "updated_at": row["updated_at"],
            "revoked_at": row["revoked_at"], "revision": row["revision"],
            # after a rotation: until when the previous secret still works (None: it does not)
            "previous_valid_until": row["previous_until"] if row.get("previous_until") and
            row["previous_until"] > time.time() else None}


class KeyStore:
    def __init__(self, db: Database) -> None:
        self.db = db

    def create(self, actor: str, *, name: str, rpm: int | None = None, tpm: int | None = None,
               endpoints: list[str] | None = None, expires_at: int | None = None, max_parallel: int | None = None,
               budget_tokens: int | None = None, budget_period: str | None = None) -> tuple[dict, str]:
        secret = SECRET_PREFIX + secrets.token_urlsafe(32)
        now = int(time.time())
        key_id = new_id("key")
        with self.db.transaction() as db:
            db.execute("INSERT INTO api_keys (id, name, prefix, digest, rpm, tpm, endpoints, expires_at, "
                       "created_at, updated_at, revoked_at, revision, max_parallel, budget_tokens, budget_period) "
                       "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, NULL, 1, ?, ?, ?)",
                       (key_id, name, secret[:SHOWN], digest(secret), rpm, tpm,
                        json.dumps(endpoints) if endpoints is not None else None, expires_at, now, now,
                        max_parallel, budget_tokens, budget_period))
            self._audit(db, actor, "api_key.create", key_id,
                        {"name": name, "rpm": rpm, "tpm": tpm, "endpoints": endpoints, "expires_at": expires_at,
                         "max_parallel": max_parallel, "budget_tokens": budget_tokens,
                         "budget_period": budget_period})
            db.notify_change()
        return self.get(key_id), secret

    def get(self, key_id: str) -> dict:
        rows = self.db.query("SELECT * FROM api_keys WHERE id = ?", (key_id,))
        if not rows:
            raise ObjectNotFound(f"no API key {key_id!r}", param="id", code="api_key_not_found")
        return self._with_use([public(rows[0])])[0]

    def list(self, limit: int, after: str | None = None) -> dict:
        rows = self.db.query("SELECT * FROM api_keys WHERE id > ? ORDER BY id LIMIT ?", (after or "", limit + 1))
        out = page(rows, limit, public)
        self._with_use(out["data"])
        return out

    def _with_use(self, records: list[dict]) -> list[dict]:
        """Each key's last use (the minute) and its last 24 hours, from the usage table: as of
        the last flush, since usage is written in batches (control/usage). One query per page."""
        if not records:
            return records
        ids = [r["id"] for r in records]
        since = int(time.time()) // 60 * 60 - 86400
        rows = self.db.query(
            "SELECT key_id, MAX(minute) AS last, SUM(CASE WHEN minute >= ? THEN requests ELSE 0 END) AS requests, "
            "SUM(CASE WHEN minute >= ? THEN prompt_tokens + completion_tokens ELSE 0 END) AS tokens FROM usage "
            f"WHERE key_id IN ({', '.join('?' * len(ids))}) GROUP BY key_id", (since, since, *ids))
        used = {r["key_id"]: r for r in rows}
        for record in records:
            r = used.get(record["id"])
            record["last_used_at"] = int(r["last"]) if r else None
            record["usage_24h"] = {"requests": int(r["requests"] or 0) if r else 0,
                                   "total_tokens": int(r["tokens"] or 0) if r else 0}
        return records

    def patch(self, actor: str, key_id: str, changes: dict[str, Any], if_match: int | None) -> dict:
        """`changes` holds only fields the client sent; None resets one (no limit, no expiry)."""
        unknown = set(changes) - set(LIMIT_FIELDS)
        assert not unknown, unknown          # the API's model admits only these
        with self.db.transaction() as db:
            current = self.get(key_id)
            if current["revoked_at"] is not None:
                raise Conflict(f"API key {key_id!r} is revoked; create a new one", param="id")
            if if_match is not None and if_match != current["revision"]:
                raise PreconditionFailed(f"API key {key_id!r} is at revision {current['revision']}, not "
                                         f"{if_match}: read it again and retry", param="If-Match")
            if changes:
                sets = ", ".join(f"{k} = ?" for k in changes)
                values = [json.dumps(v) if k == "endpoints" and v is not None else v for k, v in changes.items()]
                db.execute(f"UPDATE api_keys SET {sets}, updated_at = ?, revision = revision + 1 WHERE id = ?",
                           (*values, int(time.time()), key_id))
                self._audit(db, actor, "api_key.update", key_id, changes)
                db.notify_change()
        return self.get(key_id)

    def revoke(self, actor: str, key_id: str) -> dict:
        with self.db.transaction() as db:
            current = self.get(key_id)
            if current["revoked_at"] is not None:
                raise Conflict(f"API key {key_id!r} was revoked already (at {current['revoked_at']})", param="id")
            now = int(time.time())
            db.execute("UPDATE api_keys SET revoked_at = ?, updated_at = ?, revision = revision + 1 WHERE id = ?",
                       (now, now, key_id))
            self._audit(db, actor, "api_key.revoke", key_id, {})
            db.notify_change()
        return self.get(key_id)

    def rotate(self, actor: str, key_id: str, grace_seconds: int) -> tuple[dict, str]:
        """A new secret for the key (its id, limits and usage stay); the old one keeps working
        for `grace_seconds`, so clients can switch without an outage."""
        secret = SECRET_PREFIX + secrets.token_urlsafe(32)
        now = int(time.time())
        with self.db.transaction() as db:
            current = self.get(key_id)
            if current["revoked_at"] is not None:
                raise Conflict(f"API key {key_id!r} is revoked; create a new one", param="id")
            db.execute("UPDATE api_keys SET previous_digest = digest, previous_until = ?, digest = ?, prefix = ?, "
                       "updated_at = ?, revision = revision + 1 WHERE id = ?",
                       (now + grace_seconds, digest(secret), secret[:SHOWN], now, key_id))
            self._audit(db, actor, "api_key.rotate", key_id, {"grace_seconds": grace_seconds})
            db.notify_change()
        return self.get(key_id), secret

    def active(self) -> list[ActiveKey]:
        rows = self.db.query("SELECT id, digest, rpm, tpm, endpoints, expires_at, previous_digest, previous_until, "
                             "max_parallel, budget_tokens, budget_period FROM api_keys WHERE revoked_at IS NULL")
        return [ActiveKey(r["id"], bytes.fromhex(r["digest"]), r["rpm"] or 0, r["tpm"] or 0,
                          frozenset(json.loads(r["endpoints"])) if r["endpoints"] is not None else None,
                          r["expires_at"], bytes.fromhex(r["previous_digest"]) if r["previous_digest"] else None,
                          r["previous_until"], r["max_parallel"] or 0,
                          (r["budget_tokens"] or 0) if r["budget_period"] else 0, r["budget_period"]) for r in rows]

    def audit(self, limit: int, after: str | None = None) -> dict:
        rows = self.db.query("SELECT * FROM audit_log WHERE id > ? ORDER BY id LIMIT ?", (after or "", limit + 1))
        return page(rows, limit, lambda r: {"id": r["id"], "object": "audit_entry", "at": r["at"], "actor": r["actor"],
                                            "action": r["action"], "object_id": r["object_id"],
                                            "detail": json.loads(r["detail"])})

    _audit = staticmethod(write_audit)
