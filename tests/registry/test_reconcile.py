"""The registry's reconciler (run-time endpoints) with a scripted engine: pure state logic, no
model. Unload and delete drain what is in flight (up to the grace period) before the engine
stops; a delete during a load waits for the load and then stops what it started; a new spec
reloads; a failed endpoint tries again when its revision moves."""

from __future__ import annotations

import asyncio
import dataclasses

from modelyard.registry.endpoint import EndpointState as S
from modelyard.registry.registry import Registry
from modelyard.settings import EndpointSpec, Settings

REMOTE = EndpointSpec(name="rt", engine="openai", urls=("http://127.0.0.1:9/v1",))


class Scripted:
    def __init__(self, spec, gate: asyncio.Event, fail: bool = False) -> None:
        self.spec, self.gate, self.fail = spec, gate, fail
        self.in_flight, self.started, self.stopped = 0, False, False

    async def start(self) -> None:
        await self.gate.wait()
        if self.fail:
            raise RuntimeError("cannot start")
        self.started = True

    async def stop(self) -> None:
        self.stopped = True

    def ready_reason(self):
        return None

    def status(self):
        return {"in_flight": self.in_flight}


def harness(tmp_path, grace: float = 30.0, fail_first: bool = False):
    engines: list[Scripted] = []
    gate = asyncio.Event()
    gate.set()

    def factory(spec, path):
        engines.append(Scripted(spec, gate, fail=fail_first and not engines))
        return engines[-1]
    reg = Registry(Settings(store_dir=tmp_path, endpoints=(), grace_period=grace), engine_factory=factory)
    seen: list[tuple[str, S]] = []
    reg.listen(lambda ep: seen.append((ep.name, ep.state)))
    reg.start()
    return reg, engines, gate, seen


async def settle(reg: Registry, name: str = "rt") -> None:
    task = reg._tasks.get(name)
    if task is not None:
        await asyncio.wait_for(asyncio.shield(task), 5)


def test_delete_during_a_load_stops_what_the_load_started(tmp_path):
    async def scenario():
        reg, engines, gate, seen = harness(tmp_path)
        gate.clear()
        reg.add(REMOTE, id="ep_1")
        await asyncio.sleep(0.01)
        assert reg.get("rt").state is S.LOADING and engines and not engines[0].started
        reg.delete("rt")
        assert reg.get("rt").state is S.DELETING          # refuses requests at once
        gate.set()
        await settle(reg)
        assert "rt" not in reg.endpoints and engines[0].started and engines[0].stopped
        assert [s for _, s in seen] == [S.LOADING, S.DELETING, S.STOPPED]
    asyncio.run(scenario())


def test_unload_drains_in_flight_requests_before_stopping(tmp_path):
    async def scenario():
        reg, engines, _, _ = harness(tmp_path)
        reg.add(REMOTE, id="ep_1")
        await settle(reg)
        assert reg.get("rt").state is S.READY
        engines[0].in_flight = 1
        reg.update("rt", REMOTE, desired="unloaded", revision=2)
        assert reg.get("rt").state is S.DRAINING
        await asyncio.sleep(0.3)
        assert not engines[0].stopped and reg.get("rt").state is S.DRAINING     # still one in flight
        engines[0].in_flight = 0
        await settle(reg)
        assert engines[0].stopped and reg.get("rt").state is S.UNLOADED and reg.get("rt").engine is None
        reg.update("rt", REMOTE, desired="loaded", revision=3)
        await settle(reg)
        assert reg.get("rt").state is S.READY and len(engines) == 2
    asyncio.run(scenario())


def test_the_grace_period_bounds_a_drain(tmp_path):
    async def scenario():
        reg, engines, _, _ = harness(tmp_path, grace=0.2)
        reg.add(REMOTE, id="ep_1")
        await settle(reg)
        engines[0].in_flight = 1            # never finishes
        reg.delete("rt")
        await settle(reg)
        assert engines[0].stopped and "rt" not in reg.endpoints
    asyncio.run(scenario())


def test_a_new_spec_reloads_and_a_failed_endpoint_retries_on_a_new_revision(tmp_path):
    async def scenario():
        reg, engines, _, _ = harness(tmp_path, fail_first=True)
        reg.add(REMOTE, id="ep_1")
        await settle(reg)
        assert reg.get("rt").state is S.FAILED and "cannot start" in reg.get("rt").reason
        reg.update("rt", REMOTE, desired="loaded", revision=1)     # same revision: nothing to do
        await settle(reg)
        assert reg.get("rt").state is S.FAILED and len(engines) == 1
        reg.update("rt", REMOTE, desired="loaded", revision=2)     # a `load`: try again
        await settle(reg)
        assert reg.get("rt").state is S.READY and len(engines) == 2
        wider = dataclasses.replace(REMOTE, timeout=5.0)
        reg.update("rt", wider, desired="loaded", revision=3)
        await settle(reg)
        assert engines[1].stopped and engines[2].spec.timeout == 5.0 and reg.get("rt").spec == wider
        assert reg.get("rt").state is S.READY
        await reg.stop()
    asyncio.run(scenario())
