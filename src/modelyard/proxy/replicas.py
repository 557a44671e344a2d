"""An endpoint's upstream replicas: one HTTP client, health probes in the background (with each,
a read of the engine's load from its /metrics: proxy/load), the choice of a replica for each
request (proxy/routing: the spec's `balance`) and the send, moving on to the next replica of the
decision's order only when the connection failed before the upstream saw anything. What is sent,
and how its answer is read, is proxy/wire's; how its failures become ours, proxy/errors'.
"""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import asdict, dataclass
from typing import Any

import httpx

from ..errors import DeadlineExceeded, EndpointNotReady
from ..periodic import Periodic
from ..settings import EndpointSpec
from .errors import map_error, reason
from .load import MAX_METRICS_BYTES, engine_load, metrics_url
from .routing import BLOCK_CHARS, Candidate, Decision, Router

log = logging.getLogger("modelyard.proxy.engine")    # the remote engine's log, as it always was

CONNECT_TIMEOUT = 5.0       # a replica that cannot accept a connection in 5 s is as good as down
PROBE_TIMEOUT = 2.0
HEALTH_INTERVAL = 2.0
# A replica that accepted the probe's connection but did not answer in time is busy, maybe not
# down (llama-cpp-python's server answers /models only between generations): it is marked down
# after this many such probes in a row. Refused or unreachable: down at once.
SLOW_PROBES_TO_DOWN = 3
# Generous: each streaming request holds one connection for its whole length.
POOL_LIMITS = httpx.Limits(max_connections=1024, max_keepalive_connections=256, keepalive_expiry=30.0)
# These happen before the upstream saw the request: the replica is down, the next one is tried.
CONNECT_ERRORS = (httpx.ConnectError, httpx.ConnectTimeout)
# The connection died before the answer's first byte (a killed engine; a kept-alive connection
# the server had just closed). The upstream may have begun the work, but the client has seen
# nothing, so the request is sent again: once more to the same replica on a fresh connection
# (a stale one is no sign of a down replica; a dead one then refuses the connect, and is marked
# down), then on to the decision's next.
DROPPED_ERRORS = (httpx.RemoteProtocolError, httpx.ReadError, httpx.WriteError)
# A replica whose /metrics gave nothing usable (404, no known series) is asked again only
# every this many probes: most engines that lack it lack it for good.
METRICS_RETRY_PROBES = 30


@dataclass(frozen=True)
class Route:
    """What a request is routed by (proxy/routing): its prompt's text, its session, its cache
    partition (so one tenant's prompts never match another's)."""
    text: str | None = None
    session: str | None = None
    salt: str = ""


@dataclass(eq=False)
class Replica:
    url: str                              # base URL, e.g. http://host:8001/v1
    index: int = 0                        # its place in spec.urls: the only label it gets in /metrics
    name: str = ""                        # what routing hashes: its URL (#k for a repeated one)
    healthy: bool = False
    in_flight: int = 0
    last_error: str | None = "not probed yet"
    slow_probes: int = 0                  # probes in a row that connected but timed out
    engine_load: float | None = None      # running + waiting, from its /metrics at the last probe
    in_flight_at_scrape: int = 0          # this gateway's in_flight then
    metrics_skip: int = 0                 # probes to go before /metrics is asked again
    requests: int = 0                     # sent here (the upstream accepted the connection)
    prefix_hit_blocks: int = 0            # of those, blocks of prompt this gateway had sent here before
    overload_spills: int = 0              # requests whose preferred replica this was, sent elsewhere: overloaded
    dropped: int = 0                      # connections it dropped before answering (each request sent again)

    @property
    def load(self) -> float:
        """Requests running and waiting there: its engine's figure plus what this gateway sent
        since it was read; this gateway's in_flight where the engine reports none."""
        if self.engine_load is None:
            return float(self.in_flight)
        return self.engine_load + max(0, self.in_flight - self.in_flight_at_scrape)

    def as_dict(self) -> dict[str, Any]:
        out = asdict(self)
        del out["in_flight_at_scrape"], out["metrics_skip"], out["name"]
        out["load"] = self.load
        out["prefix_hit_chars"] = self.prefix_hit_blocks * BLOCK_CHARS
        return out


class ReplicaPool:
    """One endpoint's replicas (`spec.urls`) and the HTTP client they share."""

    def __init__(self, spec: EndpointSpec, transport: httpx.AsyncBaseTransport | None = None, *,
                 health_interval: float = HEALTH_INTERVAL) -> None:
        self.spec = spec
        self._transport = transport
        self._interval = health_interval
        self._replicas = [Replica(url.rstrip("/"), i) for i, url in enumerate(spec.urls)]
        for r in self._replicas:      # the same names on every gateway configured with the same URLs
            twins = sum(1 for x in self._replicas[:r.index] if x.url == r.url)
            r.name = r.url + (f"#{twins}" if twins else "")
        self.router = Router(spec.balance, abs_threshold=spec.balance_abs_threshold,
                             rel_threshold=spec.balance_rel_threshold, capacity=spec.prefix_blocks)
        self._client: httpx.AsyncClient | None = None
        self._health: Periodic | None = None     # the probes every health_interval, once started

    async def start(self) -> None:
        headers = {"Authorization": f"Bearer {self.spec.api_key}"} if self.spec.api_key else {}
        # trust_env=False: settings are the only reader of the environment (no proxy vars).
        self._client = httpx.AsyncClient(
            transport=self._transport, headers=headers, limits=POOL_LIMITS, trust_env=False,
            timeout=httpx.Timeout(self.spec.timeout, connect=CONNECT_TIMEOUT))
        # No replica answering is not a start failure: the endpoint is just not ready yet.
        await self.probe_all()
        self._health = Periodic(f"health:{self.spec.name}", self._interval, self.probe_all, log=log, traceback=True,
                                failure=f"health probe of endpoint {self.spec.name} failed")
        self._health.start()

    async def stop(self) -> None:
        health, self._health = self._health, None
        if health is not None:
            await health.stop()
        client, self._client = self._client, None
        if client is not None:
            await client.aclose()

    async def probe(self, replica: Replica) -> None:
        """One health check: GET base/models; healthy on 2xx."""
        try:
            resp = await self.client().get(replica.url + "/models", timeout=PROBE_TIMEOUT)
        except (httpx.ReadTimeout, httpx.WriteTimeout) as exc:
            replica.slow_probes += 1
            if not replica.healthy or replica.slow_probes >= SLOW_PROBES_TO_DOWN:
                self.mark_down(replica, reason(exc))
            else:
                log.info("endpoint %s: replica %s was slow to answer a probe (%d in a row)",
                         self.spec.name, replica.url, replica.slow_probes)
            return
        except httpx.HTTPError as exc:
            self.mark_down(replica, reason(exc))
            return
        replica.slow_probes = 0
        if resp.is_success:
            replica.healthy, replica.last_error = True, None
            await self.read_load(replica)
        else:
            self.mark_down(replica, f"HTTP {resp.status_code}")

    async def read_load(self, replica: Replica) -> None:
        """Its engine's load from GET /metrics at the URL's root (proxy/load); kept as it was on
        a failed read, forgotten (this gateway's count instead) when the engine serves none."""
        if replica.metrics_skip > 0:
            replica.metrics_skip -= 1
            return
        seen = replica.in_flight
        try:
            async with self.client().stream("GET", metrics_url(replica.url), timeout=PROBE_TIMEOUT) as resp:
                if not resp.is_success or int(resp.headers.get("content-length") or 0) > MAX_METRICS_BYTES:
                    load = None
                else:
                    chunks, size = [], 0
                    async for chunk in resp.aiter_bytes():
                        size += len(chunk)
                        if size > MAX_METRICS_BYTES:
                            raise ValueError(f"/metrics is above {MAX_METRICS_BYTES} bytes")
                        chunks.append(chunk)
                    load = engine_load(b"".join(chunks).decode("utf-8", "replace"))
        except httpx.HTTPError:
            return        # a slow scrape: the last figure stands until the next probe
        except ValueError as exc:     # too large, or not an exposition
            log.info("endpoint %s: replica %d's /metrics is unusable: %s", self.spec.name, replica.index, exc)
            load = None
        replica.engine_load, replica.in_flight_at_scrape = load, seen
        if load is None:
            replica.metrics_skip = METRICS_RETRY_PROBES

    async def probe_all(self) -> None:
        await asyncio.gather(*(self.probe(r) for r in self._replicas))

    def mark_down(self, replica: Replica, reason: str) -> None:
        if replica.healthy:
            log.warning("endpoint %s: replica %s is down: %s", self.spec.name, replica.url, reason)
            # what it cached may be gone with it (a restarted engine): placed afresh when it is back
            self.router.forget(replica.name)
        replica.healthy, replica.last_error = False, reason

    @property
    def replicas(self) -> list[Replica]:
        return list(self._replicas)

    def ready_reason(self) -> str | None:
        if any(r.healthy for r in self._replicas):
            return None
        return "no replica answers: " + "; ".join(f"{r.url}: {r.last_error}" for r in self._replicas)

    def status(self) -> dict[str, Any]:
        return {"replicas": [r.as_dict() for r in self._replicas], "balance": self.spec.balance,
                "in_flight": sum(r.in_flight for r in self._replicas)}

    async def send(self, path: str, body: dict | None, deadline: float | None, route: Route | None = None, *,
                   root: bool = False, **request: Any) -> tuple[Replica, httpx.Response]:
        """Open the upstream stream on the replica `route` picks (proxy/routing), trying the
        decision's next on connect errors, and the same replica again, then the next, when the
        connection dies before the first byte (DROPPED_ERRORS). `body` goes as JSON; `request` (content, headers) is
        httpx's, for bodies passed through as they came. `root`: `path` is at the URL's root
        (vLLM's /classify, /pooling), not under its /v1."""
        client = self.client()
        decision = self.decide(route)
        by_name = {r.name: r for r in self._replicas}
        dropped: BaseException | None = None
        for name in decision.order:
            replica = by_name[name]
            for _ in range(2):               # a second try only after a dropped connection
                if not replica.healthy:      # marked down since the decision (a connect error of another request)
                    break
                replica.in_flight += 1
                opened = False
                try:
                    base = metrics_url(replica.url).rsplit("/metrics", 1)[0] if root else replica.url
                    sent = client.build_request("POST", base + path, json=body,
                                                timeout=timeout_for(self.spec.timeout, deadline), **request)
                    resp = await client.send(sent, stream=True)
                    opened = True
                except CONNECT_ERRORS as exc:
                    self.mark_down(replica, reason(exc))
                    break
                except DROPPED_ERRORS as exc:
                    dropped = exc
                    replica.dropped += 1
                    log.info("endpoint %s: replica %s dropped a connection before answering (%s): sent again",
                             self.spec.name, replica.url, reason(exc))
                    continue
                except httpx.HTTPError as exc:
                    raise map_error(replica.url, exc, deadline) from exc
                finally:
                    if not opened:
                        replica.in_flight -= 1
                self._count(replica, decision)
                return replica, resp
        if dropped is not None and self.ready_reason() is None:      # live replicas, every try dropped
            raise map_error(self.spec.name, dropped, deadline) from dropped
        raise EndpointNotReady(self.ready_reason() or "no replica answers")

    @staticmethod
    async def release(replica: Replica | None, resp: httpx.Response | None) -> None:
        """What send() opened, given back however the request ended: the replica's in-flight
        count first (it must drop even if closing fails), then the answer (its connection back to
        the pool, or dropped mid-stream)."""
        if replica is not None:
            replica.in_flight -= 1
        if resp is not None:
            await resp.aclose()

    def decide(self, route: Route | None = None) -> Decision:
        """The routing decision over the healthy replicas: the chosen one first, then the order
        to fail over in (before the first byte only)."""
        route = route or Route()
        live = [r for r in self._replicas if r.healthy]
        return self.router.choose([Candidate(r.name, r.load, r.in_flight) for r in live], route.text,
                                  session=route.session, salt=route.salt)

    def _count(self, replica: Replica, decision: Decision) -> None:
        replica.requests += 1
        if replica.name == decision.order[0]:
            replica.prefix_hit_blocks += decision.matched_blocks
        if decision.spilled_from is not None:
            spilled = next((r for r in self._replicas if r.name == decision.spilled_from), None)
            if spilled is not None:
                spilled.overload_spills += 1
        self.router.record(replica.name, decision.hashes)

    def client(self) -> httpx.AsyncClient:
        if self._client is None:
            raise EndpointNotReady(f"endpoint {self.spec.name!r} is not started")
        return self._client


def timeout_for(limit: float, deadline: float | None) -> httpx.Timeout:
    """Per-request timeouts: the spec's read timeout, shortened to what the deadline leaves."""
    if deadline is not None:
        left = deadline - time.monotonic()
        if left <= 0:
            raise DeadlineExceeded("request deadline passed before reaching the upstream")
        limit = min(limit, left)
    return httpx.Timeout(limit, connect=min(CONNECT_TIMEOUT, limit))
