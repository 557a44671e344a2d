"""What every control-plane table shares: sortable ids, the audit log, cursor-paged lists, the
database's server-held secrets."""

from __future__ import annotations

import json
import os
import secrets
import threading
import time
from typing import Any, Callable

from .db import Database, Row

_last_us = 0
_id_lock = threading.Lock()


def new_id(kind: str) -> str:
    """Sortable by creation (microseconds first, strictly increasing within a process), unique
    across processes (random tail): the lists' cursor."""
    global _last_us
    with _id_lock:
        _last_us = max(time.time_ns() // 1000, _last_us + 1)
        stamp = _last_us
    return f"{kind}_{stamp:014x}{os.urandom(5).hex()}"


def audit(db: Database, actor: str, action: str, object_id: str, detail: dict) -> None:
    """One admin action (inside the caller's transaction): who, what, on which id; `detail`
    holds settings, never a secret."""
    db.execute("INSERT INTO audit_log (id, at, actor, action, object_id, detail) VALUES (?, ?, ?, ?, ?, ?)",
               (new_id("audit"), int(time.time()), actor, action, object_id, json.dumps(detail)))


def page(rows: list[Row], limit: int, render: Callable[[Row], dict[str, Any]]) -> dict:
    """`rows` (up to limit + 1, in id order) -> the platform's list object."""
    data = [render(r) for r in rows[:limit]]
    return {"object": "list", "data": data, "has_more": len(rows) > limit,
            "last_id": data[-1]["id"] if data else None}


def first_id_page(rows: list[Row], limit: int, render: Callable[[Row], dict[str, Any]]) -> dict:
    """`page`, with OpenAI's `first_id` too (the Files and Batch APIs' lists)."""
    out = page(rows, limit, render)
    out["first_id"] = out["data"][0]["id"] if out["data"] else None
    return out


def server_secret(db: Database, name: str) -> bytes:
    """The database's random secret `name` (the configured keys' id key): made by the first
    process that needs it, read by every other one sharing the database, kept across restarts. The table is migration 7's (named for its first use); no
    route reads it."""
    with db.transaction() as tx:
        tx.execute("INSERT INTO console_secret (name, value, created_at) VALUES (?, ?, ?) "
                   "ON CONFLICT (name) DO NOTHING", (name, secrets.token_hex(32), int(time.time())))
        rows = tx.query("SELECT value FROM console_secret WHERE name = ?", (name,))
    return bytes.fromhex(rows[0]["value"])
