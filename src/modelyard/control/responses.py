"""Stored Responses (OpenAI's Responses API, api/openai/responses): each response as answered,
owned by the key that created it, and the input items it was generated from, in order; and
`Responses`, the store of responses and conversations (control/conversations) one server opens.

Why the whole context is stored with each response, not only its own input: continuing a
response (`previous_response_id`) then reads one row set, not a chain of them, deleting an early
response does not break the later ones, and `input_items` shows what the model saw (a chain's
earlier turns included), as OpenAI's does. A chain of n turns stores O(n²) items; retention
bounds how long they live.

Ownership is a WHERE clause: every read and delete names the key, so another key's response is
"not found" (404), never "forbidden": a caller does not learn that it exists. A keyless server
stores under the key id "" (one tenant).

Why the store is opened on first use (`Responses`): a server whose control plane is off still
stores responses (in `settings.database`, the control plane's database when it is on), but a
server whose clients never call /responses should not create or migrate a database for them;
a database that cannot be opened is then the first /responses request's error, not the
server's. The retention sweep starts with it.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from typing import Any, Callable

from ..errors import InvalidRequest, ObjectNotFound
from ..periodic import Periodic
from .db import Database, open_database
from .records import audit, page

log = logging.getLogger("modelyard.responses")
DAY = 86_400
SWEEP_INTERVAL = 3600.0     # seconds between retention sweeps (expired rows are unreadable at once)


def owner(key_id: str | None) -> str:
    return key_id or ""


class ResponseStore:
    """Blocking calls (control/db): the routes run them on a worker thread."""

    def __init__(self, db: Database, retention_days: int) -> None:
        self.db = db
        self.retention = retention_days * DAY

    def save(self, key_id: str | None, body: dict, items: list[dict], lease_until: int | None = None) -> None:
        """The response and its input items, in one transaction (`lease_until`: a background
        one, in progress)."""
        now = int(time.time())
        with self.db.transaction() as tx:
            tx.execute("INSERT INTO responses (id, key_id, model, status, previous_response_id, body, created_at, "
                       "expires_at, lease_until) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
                       (body["id"], owner(key_id), body["model"], body["status"], body.get("previous_response_id"),
                        json.dumps(body), int(body["created_at"]), now + self.retention, lease_until))
            for position, item in enumerate(items):
                tx.execute("INSERT INTO response_items (response_id, position, id, item) VALUES (?, ?, ?, ?)",
                           (body["id"], position, item["id"], json.dumps(item)))

    def get(self, key_id: str | None, response_id: str) -> dict:
        now = int(time.time())
        rows = self.db.query("SELECT body, lease_until FROM responses WHERE id = ? AND key_id = ? AND expires_at > ?",
                             (response_id, owner(key_id), now))
        if not rows:
            raise ObjectNotFound(f"no response with id {response_id!r}", param="response_id")
        if rows[0]["lease_until"] is not None and rows[0]["lease_until"] < now:
            self.fail_stale(now)        # its gateway died: a client polling it learns so now
            return self.get(key_id, response_id)
        return json.loads(rows[0]["body"])

    def context(self, key_id: str | None, response_id: str) -> list[dict]:
        """What continuing `response_id` starts from: its input items, then its output."""
        try:
            body = self.get(key_id, response_id)
        except ObjectNotFound:
            raise ObjectNotFound(f"previous_response_id {response_id!r}: no stored response with that id (one "
                                 "created with store: false is not kept)", param="previous_response_id") from None
        rows = self.db.query("SELECT item FROM response_items WHERE response_id = ? ORDER BY position",
                             (response_id,))
        return [json.loads(r["item"]) for r in rows] + list(body["output"])

    def items_page(self, key_id: str | None, response_id: str, limit: int, after: str | None,
                   order: str) -> dict:
        """OpenAI's list object of the response's input items, `order` asc or desc by position."""
        self.get(key_id, response_id)
        return items_page(self.db, "response_items", "response_id", response_id, limit, after, order)

    def delete(self, key_id: str | None, response_id: str) -> None:
        with self.db.transaction() as tx:
            if not tx.execute("DELETE FROM responses WHERE id = ? AND key_id = ?", (response_id, owner(key_id))):
                raise ObjectNotFound(f"no response with id {response_id!r}", param="response_id")
            tx.execute("DELETE FROM response_items WHERE response_id = ?", (response_id,))

    # -- the admin API (api/admin/responses): every key's, metadata only -------------------------

    def listed(self, key_id: str | None, limit: int, after: str | None) -> dict:
        """Stored responses in id (creation) order: who owns each, its model, status and times;
        never its content (an operator manages storage, not reads conversations)."""
        where, params = ["expires_at > ?"], [int(time.time())]
        if key_id is not None:
            where.append("key_id = ?")
            params.append(key_id)
        if after is not None:
            where.append("id > ?")
            params.append(after)
        rows = self.db.query("SELECT id, key_id, model, status, previous_response_id, created_at, expires_at FROM "
                             f"responses WHERE {' AND '.join(where)} ORDER BY id LIMIT ?", (*params, limit + 1))
        return page(rows, limit, lambda r: {**r, "object": "response.summary"})

    def remove(self, actor: str, response_id: str) -> None:
        """Any key's response deleted by an admin, audited."""
        with self.db.transaction() as tx:
            rows = tx.query("SELECT key_id FROM responses WHERE id = ?", (response_id,))
            if not rows:
                raise ObjectNotFound(f"no response with id {response_id!r}", param="response_id")
            tx.execute("DELETE FROM response_items WHERE response_id = ?", (response_id,))
            tx.execute("DELETE FROM responses WHERE id = ?", (response_id,))
            audit(tx, actor, "response.delete", response_id, {"key_id": rows[0]["key_id"]})

    # -- background responses (api/openai/background) --------------------------------------------

    def finish(self, body: dict) -> bool:
        """A background response's end (completed, incomplete, failed, cancelled), unless it has
        ended already (cancelled meanwhile, or failed for a lease that passed): whether it was."""
        return bool(self.db.execute(
            "UPDATE responses SET status = ?, body = ?, lease_until = NULL WHERE id = ? AND lease_until IS NOT NULL",
            (body["status"], json.dumps(body), body["id"])))

    def renew(self, ids: list[str], until: int) -> list[str]:
        """Extend the leases of `ids`; those that ended meanwhile (cancelled through another
        gateway, or failed) are returned: their runs should stop."""
        return [rid for rid in ids
                if not self.db.execute("UPDATE responses SET lease_until = ? WHERE id = ? AND lease_until IS NOT NULL",
                                       (until, rid))]

    def cancel(self, key_id: str | None, response_id: str) -> dict:
        """Mark a background response cancelled (wherever it runs: its gateway's end is then a
        no-op); one that has ended is answered as it is."""
        body = self.get(key_id, response_id)
        if not body.get("background"):
            raise InvalidRequest(f"response {response_id!r} was not created with background: true; only a "
                                 "background response can be cancelled", param="response_id")
        if body["status"] in ("queued", "in_progress"):
            self.finish({**body, "status": "cancelled"})
        return self.get(key_id, response_id)

    def fail_stale(self, now: int | None = None) -> int:
        """Background responses whose gateway stopped renewing their lease (it died): failed,
        never left in progress."""
        now = int(time.time()) if now is None else now
        rows = self.db.query("SELECT body FROM responses WHERE lease_until IS NOT NULL AND lease_until < ?", (now,))
        for row in rows:
            body = json.loads(row["body"])
            self.finish({**body, "status": "failed", "error": {
                "code": "server_error", "message": "the gateway that ran this background response stopped"}})
        return len(rows)

    def sweep(self, now: int | None = None) -> int:
        """Delete the responses (and their items) whose retention has passed; how many."""
        now = int(time.time()) if now is None else now
        with self.db.transaction() as tx:
            tx.execute("DELETE FROM response_items WHERE response_id IN "
                       "(SELECT id FROM responses WHERE expires_at <= ?)", (now,))
            return tx.execute("DELETE FROM responses WHERE expires_at <= ?", (now,))


def items_page(db: Database, table: str, owner_column: str, owner_id: str, limit: int, after: str | None,
               order: str) -> dict:
    """OpenAI's list object of the items of one response or conversation (`table`), in position
    order, asc or desc, from the item after `after`. `table` and `owner_column` are ours."""
    desc = order == "desc"
    where, params = f"{owner_column} = ?", [owner_id]
    if after is not None:
        at = db.query(f"SELECT position FROM {table} WHERE {owner_column} = ? AND id = ? ORDER BY position LIMIT 1",
                      (owner_id, after))
        if not at:
            raise InvalidRequest(f"after {after!r} is not an item of this list", param="after")
        where += f" AND position {'<' if desc else '>'} ?"
        params.append(at[0]["position"])
    rows = db.query(f"SELECT item FROM {table} WHERE {where} ORDER BY position {'DESC' if desc else 'ASC'} LIMIT ?",
                    (*params, limit + 1))
    data = [json.loads(r["item"]) for r in rows[:limit]]
    return {"object": "list", "data": data, "first_id": data[0]["id"] if data else None,
            "last_id": data[-1]["id"] if data else None, "has_more": len(rows) > limit}


class Responses:
    """The response store of one server, opened on first use (see the module's docstring)."""

    def __init__(self, url: str, retention_days: int, db: Database | None = None,
                 on_open: Callable[[Database], object] | None = None) -> None:
        self.url, self.retention_days = url, retention_days
        self._shared = db            # the control plane's database, when it is on: not ours to close
        # Run (on a worker thread) once the database is opened here. Responses are owned by key
        # ids, and without a control plane a configured key's id is made per process
        # (quota/keys): the app names the keys under the database's secret instead, or a
        # restarted server would not know its own keys' responses.
        self._on_open = on_open
        self._store: ResponseStore | None = None
        self._conversations = None      # control/conversations.ConversationStore, opened with the store
        self._lock = asyncio.Lock()
        self._sweep: Periodic | None = None

    async def store(self) -> ResponseStore:
        if self._store is None:
            async with self._lock:
                if self._store is None:
                    db = self._shared or await asyncio.to_thread(open_database, self.url)
                    if self._shared is None and self._on_open is not None:
                        await asyncio.to_thread(self._on_open, db)
                    from .conversations import ConversationStore     # it builds on this module
                    store = ResponseStore(db, self.retention_days)
                    self._conversations = conversations = ConversationStore(db, self.retention_days)

                    def sweep() -> None:
                        store.fail_stale()
                        store.sweep()
                        conversations.sweep()
                    await asyncio.to_thread(sweep)
                    self._sweep = Periodic("responses-sweep", SWEEP_INTERVAL, lambda: asyncio.to_thread(sweep),
                                           log=log, failure="response retention sweep failed (retried next round)")
                    self._sweep.start()
                    self._store = store
        return self._store

    async def database(self) -> Database:
        """The database this store opened (or shares): the Files and Batches APIs' too
        (control/files, control/batches), opened once and named the same way."""
        return (await self.store()).db

    async def run(self, method: str, *args: Any) -> Any:
        """`ResponseStore.<method>(*args)` on a worker thread."""
        store = await self.store()
        return await asyncio.to_thread(getattr(store, method), *args)

    async def conversation(self, method: str, *args: Any) -> Any:
        """`ConversationStore.<method>(*args)` on a worker thread."""
        await self.store()
        return await asyncio.to_thread(getattr(self._conversations, method), *args)

    async def close(self) -> None:
        if self._sweep is not None:
            await self._sweep.stop()
        if self._store is not None and self._shared is None:
            await asyncio.to_thread(self._store.db.close)
