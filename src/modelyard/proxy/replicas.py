"""An endpoint's upstream replicas: one HTTP client, health probes in the background, the choice
of a replica for each request (the least busy healthy one) and the send, moving on to the next
replica only when the connection failed before the upstream saw anything. What is sent, and how
its answer is read, is proxy/wire's; how its failures become ours, proxy/errors'.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import time
from dataclasses import asdict, dataclass
from typing import Any

import httpx

from ..errors import DeadlineExceeded, EndpointNotReady
from ..periodic import Periodic
from ..settings import EndpointSpec
from .errors import map_error, reason

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
# Only these happen before the upstream saw the request, so only these are safe to retry.
CONNECT_ERRORS = (httpx.ConnectError, httpx.ConnectTimeout)


@dataclass(eq=False)
class Replica:
    url: str                              # base URL, e.g. http://host:8001/v1
    healthy: bool = False
    in_flight: int = 0
    last_error: str | None = "not probed yet"
    slow_probes: int = 0                  # probes in a row that connected but timed out

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


class ReplicaPool:
    """One endpoint's replicas (`spec.urls`) and the HTTP client they share."""

    def __init__(self, spec: EndpointSpec, transport: httpx.AsyncBaseTransport | None = None, *,
                 health_interval: float = HEALTH_INTERVAL) -> None:
        self.spec = spec
        self._transport = transport
        self._interval = health_interval
        self._replicas = [Replica(url.rstrip("/")) for url in spec.urls]
        self._turn = itertools.count()    # breaks ties between equally loaded replicas
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
        else:
            self.mark_down(replica, f"HTTP {resp.status_code}")

    async def probe_all(self) -> None:
        await asyncio.gather(*(self.probe(r) for r in self._replicas))

    def mark_down(self, replica: Replica, reason: str) -> None:
        if replica.healthy:
            log.warning("endpoint %s: replica %s is down: %s", self.spec.name, replica.url, reason)
        replica.healthy, replica.last_error = False, reason

    @property
    def replicas(self) -> list[Replica]:
        return list(self._replicas)

    def ready_reason(self) -> str | None:
        if any(r.healthy for r in self._replicas):
            return None
        return "no replica answers: " + "; ".join(f"{r.url}: {r.last_error}" for r in self._replicas)

    def status(self) -> dict[str, Any]:
        return {"replicas": [r.as_dict() for r in self._replicas],
                "in_flight": sum(r.in_flight for r in self._replicas)}

    async def send(self, path: str, body: dict, deadline: float | None) -> tuple[Replica, httpx.Response]:
        """Open the upstream stream on the least busy healthy replica, trying the next on connect errors."""
        client = self.client()
        tried: list[Replica] = []
        while (replica := self.pick(tried)) is not None:
            tried.append(replica)
            replica.in_flight += 1
            opened = False
            try:
                request = client.build_request("POST", replica.url + path, json=body,
                                               timeout=timeout_for(self.spec.timeout, deadline))
                resp = await client.send(request, stream=True)
                opened = True
                return replica, resp
            except CONNECT_ERRORS as exc:
                self.mark_down(replica, reason(exc))
            except httpx.HTTPError as exc:
                raise map_error(replica.url, exc, deadline) from exc
            finally:
                if not opened:
                    replica.in_flight -= 1
        raise EndpointNotReady(self.ready_reason() or "no replica answers")

    def pick(self, tried: list[Replica]) -> Replica | None:
        live = [r for r in self._replicas if r.healthy and r not in tried]
        if not live:
            return None
        least = min(r.in_flight for r in live)
        tied = [r for r in live if r.in_flight == least]
        return tied[next(self._turn) % len(tied)]

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
