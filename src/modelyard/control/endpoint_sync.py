"""The stored run-time endpoints -> this process's registry: new rows are added (and load),
changed revisions update the endpoint (a new spec reloads it; unloaded drains it), rows gone
are deleted (drained, then dropped). Every process runs this, including the one that served
the admin call (right after its write), so there is one path for local and remote changes.

A stored endpoint whose name this process already serves from its config file is skipped
with one log line (config wins: it is what this process was started with).
"""

from __future__ import annotations

import asyncio
import logging

from ..registry.registry import Registry
from .endpoints import EndpointStore, StoredEndpoint

log = logging.getLogger("modelyard.control")


class EndpointSync:
    def __init__(self, store: EndpointStore, registry: Registry) -> None:
        self.store, self.registry = store, registry
        self._skipped: dict[str, int] = {}       # id -> revision already logged as skipped

    async def refresh(self) -> None:
        self.apply(await asyncio.to_thread(self.store.active))

    def apply(self, rows: list[StoredEndpoint]) -> None:
        registry, ids = self.registry, set()
        for row in rows:
            ids.add(row.id)
            ep = registry.endpoints.get(row.name)
            if ep is not None and ep.id != row.id:
                # config's, or one of the same name still being deleted here: skip for now
                if ep.desired != "deleted" and self._skipped.get(row.id) != row.revision:
                    self._skipped[row.id] = row.revision
                    log.error("stored model endpoint %s (%s) is not served here: this process has a %s "
                              "endpoint of that name", row.name, row.id, ep.source)
                continue
            try:
                if ep is None:
                    ep = registry.add(row.spec, id=row.id, desired=row.desired, revision=row.revision)
                elif ep.revision != row.revision:
                    registry.update(row.name, row.spec, desired=row.desired, revision=row.revision)
            except Exception as exc:  # noqa: BLE001 - one bad row must not stop the others
                if self._skipped.get(row.id) != row.revision:
                    self._skipped[row.id] = row.revision
                    log.error("stored model endpoint %s (%s) cannot be applied here: %s", row.name, row.id, exc)
                continue
            ep.created_at, ep.updated_at = row.created_at, row.updated_at
        for ep in list(registry.endpoints.values()):
            if ep.source == "api" and ep.id not in ids and ep.desired != "deleted":
                registry.delete(ep.name)
