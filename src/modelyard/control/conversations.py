"""Stored conversations (OpenAI's Conversations API, api/openai/conversations): a conversation's
metadata and its items in order; a response created with `conversation` reads its items as the
context and appends its input and output items (api/openai/responses).

Owned and retained as responses are (control/responses): every read names the key, so another
key's conversation is "not found"; `expires_at` moves `retention` on with every change, so a
conversation in use is never swept under its client.
"""

from __future__ import annotations

import json
import time

from ..errors import ObjectNotFound
from .db import Database
from .records import new_id
from .responses import DAY, items_page, owner


class ConversationStore:
    """Blocking calls (control/db): the routes run them on a worker thread."""

    def __init__(self, db: Database, retention_days: int) -> None:
        self.db = db
        self.retention = retention_days * DAY

    @staticmethod
    def _render(row: dict) -> dict:
        return {"id": row["id"], "object": "conversation", "created_at": row["created_at"],
                "metadata": json.loads(row["metadata"])}

    def create(self, key_id: str | None, metadata: dict, items: list[dict]) -> dict:
        now = int(time.time())
        cid = new_id("conv")
        with self.db.transaction() as tx:
            tx.execute("INSERT INTO conversations (id, key_id, metadata, created_at, expires_at) VALUES (?, ?, ?, ?, ?)",
                       (cid, owner(key_id), json.dumps(metadata), now, now + self.retention))
            self._append(tx, cid, items, 0)
        return {"id": cid, "object": "conversation", "created_at": now, "metadata": metadata}

    def get(self, key_id: str | None, cid: str, param: str = "conversation_id") -> dict:
        rows = self.db.query("SELECT * FROM conversations WHERE id = ? AND key_id = ? AND expires_at > ?",
                             (cid, owner(key_id), int(time.time())))
        if not rows:
            raise ObjectNotFound(f"no conversation with id {cid!r}", param=param)
        return self._render(rows[0])

    def update(self, key_id: str | None, cid: str, metadata: dict) -> dict:
        self.get(key_id, cid)
        self.db.execute("UPDATE conversations SET metadata = ?, expires_at = ? WHERE id = ?",
                        (json.dumps(metadata), int(time.time()) + self.retention, cid))
        return self.get(key_id, cid)

    def delete(self, key_id: str | None, cid: str) -> None:
        with self.db.transaction() as tx:
            if not tx.execute("DELETE FROM conversations WHERE id = ? AND key_id = ?", (cid, owner(key_id))):
                raise ObjectNotFound(f"no conversation with id {cid!r}", param="conversation_id")
            tx.execute("DELETE FROM conversation_items WHERE conversation_id = ?", (cid,))

    def items(self, key_id: str | None, cid: str, param: str = "conversation_id") -> list[dict]:
        """Every item, in order: the context a response in this conversation starts from."""
        self.get(key_id, cid, param)
        rows = self.db.query("SELECT item FROM conversation_items WHERE conversation_id = ? ORDER BY position", (cid,))
        return [json.loads(r["item"]) for r in rows]

    def page(self, key_id: str | None, cid: str, limit: int, after: str | None, order: str) -> dict:
        self.get(key_id, cid)
        return items_page(self.db, "conversation_items", "conversation_id", cid, limit, after, order)

    def item(self, key_id: str | None, cid: str, item_id: str) -> dict:
        self.get(key_id, cid)
        rows = self.db.query("SELECT item FROM conversation_items WHERE conversation_id = ? AND id = ?", (cid, item_id))
        if not rows:
            raise ObjectNotFound(f"no item {item_id!r} in conversation {cid!r}", param="item_id")
        return json.loads(rows[0]["item"])

    def delete_item(self, key_id: str | None, cid: str, item_id: str) -> dict:
        conversation = self.get(key_id, cid)
        if not self.db.execute("DELETE FROM conversation_items WHERE conversation_id = ? AND id = ?", (cid, item_id)):
            raise ObjectNotFound(f"no item {item_id!r} in conversation {cid!r}", param="item_id")
        return conversation

    def add(self, key_id: str | None, cid: str, items: list[dict]) -> list[dict]:
        """Append `items` (the conversation must be the key's); returns them."""
        with self.db.transaction() as tx:
            self.get(key_id, cid)
            top = tx.query("SELECT MAX(position) AS top FROM conversation_items WHERE conversation_id = ?", (cid,))
            start = 0 if top[0]["top"] is None else top[0]["top"] + 1
            self._append(tx, cid, items, start)
            tx.execute("UPDATE conversations SET expires_at = ? WHERE id = ?", (int(time.time()) + self.retention, cid))
        return items

    @staticmethod
    def _append(tx: Database, cid: str, items: list[dict], start: int) -> None:
        for position, item in enumerate(items, start):
            tx.execute("INSERT INTO conversation_items (conversation_id, position, id, item) VALUES (?, ?, ?, ?)",
                       (cid, position, item["id"], json.dumps(item)))

    def sweep(self, now: int | None = None) -> int:
        now = int(time.time()) if now is None else now
        with self.db.transaction() as tx:
            tx.execute("DELETE FROM conversation_items WHERE conversation_id IN "
                       "(SELECT id FROM conversations WHERE expires_at <= ?)", (now,))
            return tx.execute("DELETE FROM conversations WHERE expires_at <= ?", (now,))
