"""Model endpoints made at run time, kept in the control store so that they survive restarts and
every gateway process serves them (control/sync.EndpointSync applies the rows to each registry).

A row holds the endpoint's spec (settings.spec_fields, as JSON), what an admin asked for
(`desired`: loaded or unloaded) and a `revision`, the ETag: every change bumps it, a stale
If-Match is a 412. A delete removes the row; each process then drains and drops its engine.
The spec may hold the upstream's api_key (needed to call it); the API and the audit log show
only whether one is set.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass

from ..errors import Conflict, ObjectNotFound, PreconditionFailed
from ..registry.render import shown_spec
from ..settings import EndpointSpec, endpoint_spec, spec_fields
from .db import Database, Row
from .records import audit, new_id

DESIRED = ("loaded", "unloaded")


@dataclass(frozen=True)
class StoredEndpoint:
    id: str
    spec: EndpointSpec
    desired: str
    created_at: int
    updated_at: int
    revision: int

    @property
    def name(self) -> str:
        return self.spec.name


def _stored(row: Row) -> StoredEndpoint:
    return StoredEndpoint(row["id"], endpoint_spec(json.loads(row["spec"])), row["desired"],
                          row["created_at"], row["updated_at"], row["revision"])


class EndpointStore:
    def __init__(self, db: Database) -> None:
        self.db = db

    def create(self, actor: str, spec: EndpointSpec, desired: str = "loaded") -> StoredEndpoint:
        now = int(time.time())
        endpoint_id = new_id("ep")
        with self.db.transaction() as db:
            if db.query("SELECT id FROM model_endpoints WHERE name = ?", (spec.name,)):
                raise Conflict(f"a model endpoint named {spec.name!r} exists already", param="name",
                               code="endpoint_exists")
            db.execute("INSERT INTO model_endpoints (id, name, spec, desired, created_at, updated_at, revision) "
                       "VALUES (?, ?, ?, ?, ?, ?, 1)",
                       (endpoint_id, spec.name, json.dumps(spec_fields(spec)), desired, now, now))
            audit(db, actor, "model_endpoint.create", endpoint_id,
                  {"name": spec.name, "desired": desired, **shown_spec(spec)})
            db.notify_change()
        return self.get(endpoint_id)

    def get(self, endpoint_id: str) -> StoredEndpoint:
        rows = self.db.query("SELECT * FROM model_endpoints WHERE id = ?", (endpoint_id,))
        if not rows:
            raise ObjectNotFound(f"no model endpoint {endpoint_id!r}", param="id", code="model_endpoint_not_found")
        return _stored(rows[0])

    def page(self, limit: int, after: str | None = None) -> list[StoredEndpoint]:
        """Up to limit + 1 rows after the cursor, in id order."""
        rows = self.db.query("SELECT * FROM model_endpoints WHERE id > ? ORDER BY id LIMIT ?",
                             (after or "", limit + 1))
        return [_stored(r) for r in rows]

    def active(self) -> list[StoredEndpoint]:
        return [_stored(r) for r in self.db.query("SELECT * FROM model_endpoints ORDER BY id")]

    def update(self, actor: str, endpoint_id: str, if_match: int | None, *, spec: EndpointSpec | None = None,
               desired: str | None = None, action: str = "model_endpoint.update") -> StoredEndpoint:
        """A new spec and/or desired state; the revision moves even when nothing else does (a
        `load` of a failed endpoint is a request to try again, which every process sees)."""
        with self.db.transaction() as db:
            current = self._current(endpoint_id, if_match)
            new_spec = spec or current.spec
            if new_spec.name != current.name:
                raise Conflict("a model endpoint's name cannot change; create another one", param="name",
                               code="name_is_permanent")
            db.execute("UPDATE model_endpoints SET spec = ?, desired = ?, updated_at = ?, revision = revision + 1 "
                       "WHERE id = ?", (json.dumps(spec_fields(new_spec)), desired or current.desired,
                                        int(time.time()), endpoint_id))
            detail = {"desired": desired} if desired else {}
            if spec is not None:
                before, after = shown_spec(current.spec), shown_spec(spec)
                detail.update({k: v for k, v in after.items() if before.get(k) != v})
            audit(db, actor, action, endpoint_id, detail)
            db.notify_change()
        return self.get(endpoint_id)

    def delete(self, actor: str, endpoint_id: str, if_match: int | None) -> StoredEndpoint:
        with self.db.transaction() as db:
            current = self._current(endpoint_id, if_match)
            db.execute("DELETE FROM model_endpoints WHERE id = ?", (endpoint_id,))
            audit(db, actor, "model_endpoint.delete", endpoint_id, {"name": current.name})
            db.notify_change()
        return current

    def _current(self, endpoint_id: str, if_match: int | None) -> StoredEndpoint:
        current = self.get(endpoint_id)
        if if_match is not None and if_match != current.revision:
            raise PreconditionFailed(f"model endpoint {endpoint_id!r} is at revision {current.revision}, not "
                                     f"{if_match}: read it again and retry", param="If-Match")
        return current
