"""One request's accounting, in one place: `RequestLedger`.

A ledger is opened when a request is admitted (api/auth.require_key: its key's quota, the
in-flight slot that admission took) and closed when its response has ended, however it ended
(api/middleware/ledger.CloseLedger: finished, failed, deadline, client gone, stream closed). Between the
two, each engine request the route makes gets one `Entry` of it, and an engine does exactly two
things with an entry:

    await entry.reserve(most)          before any work: prompt + n * max_tokens, resolved
                                       (RateLimited when the key's tpm window or budget cannot
                                       hold it: the request is refused before it costs anything)
    entry.settle(prompt, completion)   once, on the event loop, when the engine request has ended:
                                       what it computed (for a finished request, exactly the
                                       `usage` the client is sent)

Everything that counts tokens comes from that one settle, so they agree by construction: the
usage row (control/usage, one request per ledger however many entries it has), the key's quota
window and budget (the reservation replaced by what was used: the quota's own `settle`, which
charges an overage as well), and the metrics' token counters. Nothing else in the tree counts a
request's tokens; a request cut short (its client left, it failed, it timed out) is settled by
its engine like any other, with what the engine computed for it.

Order matters for budgets read from the usage table (memory, postgres): the usage row is
written before the reservation is released, so the tokens are counted twice for a moment and
never missed.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Callable

from .limits import Slot

if TYPE_CHECKING:
    from ..control.usage import UsageRecorder
    from ..metrics import Metrics


class RequestLedger:
    """One admitted request: its key's quota (None on a keyless server), its in-flight slot, and
    whether the usage table has counted it yet."""

    __slots__ = ("quota", "slot", "usage", "metrics", "endpoint", "recorded", "batch", "closers")

    def __init__(self, quota: Any = None, slot: Slot | None = None, usage: "UsageRecorder | None" = None,
                 metrics: "Metrics | None" = None, batch: bool = False) -> None:
        self.quota, self.slot, self.usage, self.metrics = quota, slot, usage, metrics
        self.batch = batch             # a batch's line (batch/runner): its usage is marked so
        self.endpoint = "-"            # the endpoint the route resolved (usage rows, metrics)
        self.recorded = False          # the request counted once in the usage table
        self.closers: list[Callable[[], None]] = []     # what else ends with the response (on_close)

    def on_close(self, release: Callable[[], None]) -> None:
        """`release()` once the response has ended (the endpoint the request holds loaded:
        registry.serve)."""
        self.closers.append(release)
    def entries_for(self, n: int) -> list["Entry"]:
        return [Entry(self) for _ in range(n)]

    @property
    def metered(self) -> bool:
        """Whether reservations are checked (the key has a tpm window or a budget)."""
        return self.quota is not None and self.quota.metered

    def close(self) -> None:
        """The response has ended: the key's slot goes back. Entries an engine is still retiring
        (an aborted request's last step on the engine thread) settle later, by themselves."""
        if self.slot is not None:            # Slot.release is idempotent
            self.slot.release()
        closers, self.closers = self.closers, []
        for release in closers:
            release()

    def _settled(self, entry: "Entry", prompt: int, completion: int) -> None:
        # 1. the usage row (before the reservation goes: see the module's docstring)
        if self.usage is not None and self.quota is not None:
            self.usage.record(self.quota.key_id, self.endpoint, prompt, completion,
                              requests=0 if self.recorded else 1, batch=self.batch)
            self.recorded = True
        # 2. the metrics' token counters
        if self.metrics is not None:
            self.metrics.tokens(self.endpoint, prompt, completion)
        # 3. the quota: the reservation becomes what was used (an overage charged too). A
        # shared store may take a moment: its backend runs the settle in the background (a
        # failure logged, never the response's) and waits for it at shutdown.
        if self.quota is not None and (entry.reservation is not None or self.metered):
            self.quota.backend.background.spawn(self.quota.settle(entry.reservation, prompt + completion))


class Entry:
    """One engine request's place in its ledger: reserve once, settle once."""

    __slots__ = ("ledger", "reservation", "settled")

    def __init__(self, ledger: RequestLedger) -> None:
        self.ledger = ledger
        self.reservation: Any = None
        self.settled = False

    async def reserve(self, tokens: int) -> None:
        """The most this engine request may use, held in the key's tpm window and budget;
        RateLimited if they cannot hold it (before any work)."""
        ledger = self.ledger
        if ledger.metered:
            self.reservation = await ledger.quota.reserve(tokens)

    def settle(self, prompt_tokens: int, completion_tokens: int) -> None:
        """What the engine computed for it, once, however it ended (on the event loop)."""
        if self.settled:
            return
        self.settled = True
        self.ledger._settled(self, prompt_tokens, completion_tokens)

