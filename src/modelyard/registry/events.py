"""The one stream of endpoint changes, for whoever shows endpoints live: the admin API's
`/model-endpoints/events` (api/admin/endpoints) and the console's Endpoints table
(console/pages/endpoints). Snapshots are registry/render's objects, so both show the same endpoint.
"""

from __future__ import annotations

import asyncio
from typing import TYPE_CHECKING, AsyncIterator, Awaitable, Callable

from .endpoint import Endpoint, EndpointState
from .render import endpoint_object

if TYPE_CHECKING:
    from .registry import Registry

KEEPALIVE = 15.0        # seconds between SSE comments on a quiet stream (proxies close idle ones)
SNAPSHOT_POLL = 1.0     # seconds between looks for changes that are not state changes (replicas, counters)


async def endpoint_events(registry: "Registry", started: int, only: str | None = None,
                          alive: Callable[[], Awaitable[bool]] | None = None,
                          polls: bool = False) -> AsyncIterator[tuple[str, dict]]:
    """(event, data) pairs: every endpoint's snapshot at once, then one at each change: state
    changes as they happen (each transition, with its reason), other changes (replica health,
    progress, counters) within SNAPSHOT_POLL; ("deleted", {"id", "name"}) when one is gone;
    ("keepalive", {}) after KEEPALIVE quiet seconds. It ends once `alive()` is false (checked at
    least every SNAPSHOT_POLL: a revoked token's stream ends within the sync bound plus that).
    With `polls`, a ("poll", {}) after each quiet poll too (the console re-renders then: its
    table shows rates that change without any endpoint changing)."""
    changes: asyncio.Queue = asyncio.Queue(maxsize=10_000)

    def on_change(ep: Endpoint) -> None:
        if only is None or ep.id == only:
            try:
                changes.put_nowait((ep, ep.state, ep.reason))
            except asyncio.QueueFull:       # a stalled reader: the next poll resends the state
                pass
    unsubscribe = registry.listen(on_change)
    last: dict[str, dict] = {}
    names: dict[str, str] = {}
    loop = asyncio.get_running_loop()
    said = loop.time()
    first = True
    try:
        while alive is None or await alive():
            out: list[tuple[str, dict]] = []
            items: list[tuple[Endpoint, EndpointState | None, str | None]] = []
            if not first:
                try:
                    items.append(await asyncio.wait_for(changes.get(), SNAPSHOT_POLL))
                except asyncio.TimeoutError:
                    pass
            first = False
            if not items:       # the poll: everything, and what is gone
                items = [(ep, None, None) for ep in list(registry.endpoints.values()) if only is None or ep.id == only]
                for gone in set(last) - {ep.id for ep, _, _ in items}:
                    last.pop(gone)
                    out.append(("deleted", {"id": gone, "name": names.pop(gone)}))
            for ep, state, reason in items:
                if ep.state is EndpointState.STOPPED and registry.endpoints.get(ep.name) is not ep:
                    if last.pop(ep.id, None) is not None:
                        out.append(("deleted", {"id": ep.id, "name": names.pop(ep.id, ep.name)}))
                    continue
                snap = endpoint_object(ep, state=state, reason=reason, started=started)
                if last.get(ep.id) != snap:
                    last[ep.id], names[ep.id] = snap, ep.name
                    out.append(("endpoint", snap))
            for event in out:
                yield event
            if polls and not out:
                yield "poll", {}
            if out:
                said = loop.time()
            elif loop.time() - said >= KEEPALIVE:
                said = loop.time()
                yield "keepalive", {}
    finally:
        unsubscribe()
