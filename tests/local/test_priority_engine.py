"""Batch priority on the real default model (issue 23), through LocalEngine in process (no
client can mark a request as batch: only the batch runner does): a batch request preempted by
interactive ones answers exactly what the same request answers interactively (greedy), and the
engine's preemption counter says it was preempted."""

from __future__ import annotations

import asyncio
import os
from types import SimpleNamespace

import pytest

from modelyard import settings as settings_mod
from modelyard.engine.types import ChoiceDelta, EngineRequest, SamplingParams, Usage
from modelyard.local.engine import LocalEngine
from modelyard.metrics import _EndpointCollector
from modelyard.registry.endpoint import EndpointState
from modelyard.settings import EndpointSpec
from modelyard.store import ModelStore
from testkit.until import until

pytestmark = pytest.mark.model

MODEL = "smollm2-135m"
MESSAGES = ({"role": "user", "content": "Write a short story about a lighthouse keeper."},)


@pytest.fixture(scope="module")
def model_path():
    return ModelStore(settings_mod.load(env=os.environ).store_dir, progress=False).resolve(MODEL)


def _request(rid: str, priority: str, max_tokens: int = 48) -> EngineRequest:
    return EngineRequest(request_id=rid, prompt="", messages=MESSAGES, sampling=SamplingParams(),
                         max_tokens=max_tokens, priority=priority)


async def _answer(engine: LocalEngine, r: EngineRequest) -> tuple[str, Usage]:
    text, usage = "", None
    async for out in engine.generate(r):
        if isinstance(out, ChoiceDelta):
            text += out.text
        elif isinstance(out, Usage):
            usage = out
    return text, usage


def _metric(engine: LocalEngine, name: str) -> float:
    """The endpoint's sample of `name` as /metrics renders it (metrics._EndpointCollector over a
    registry of this one engine)."""
    endpoint = SimpleNamespace(name=MODEL, state=EndpointState.READY, engine=engine, not_ready_reason=lambda: None,
                               loaded=True, resident=None, pending=0, counts={},
                               spec=SimpleNamespace(engine="llamacpp"))
    for family in _EndpointCollector(SimpleNamespace(endpoints={MODEL: endpoint})).collect():
        for sample in family.samples:
            if sample.name == f"{name}_total" and sample.labels == {"endpoint": MODEL}:
                return sample.value
    raise AssertionError(f"no {name} sample")


def test_a_preempted_batch_request_answers_as_an_interactive_one(model_path):
    # One slot: every interactive arrival must take it from the batch request.
    engine = LocalEngine(EndpointSpec(name=MODEL, model=MODEL, context=512, parallel=1, threads=1), model_path)

    def generating() -> bool:
        running = engine._core.scheduler.running       # read only: a poll from another thread
        return bool(running) and running[0].batch and len(running[0].seqs[0].output_ids) >= 4

    async def main() -> None:
        await engine.start()
        try:
            batch = asyncio.ensure_future(_answer(engine, _request("b", "batch")))
            interactive = []
            for k in range(2):
                await asyncio.to_thread(until, generating, 120, "the batch request generating")
                interactive.append(await _answer(engine, _request(f"i{k}", "interactive", max_tokens=4)))
            got, got_usage = await asyncio.wait_for(batch, 300)
            status = engine.status()
            assert status["batch_preemptions"] == 2
            assert _metric(engine, "modelyard_batch_preemptions") == 2.0
            assert status["batch_queue_depth"] == 0 and status["batch_running"] == 0
            want, want_usage = await _answer(engine, _request("again", "interactive"))
            assert got == want and len(got) > 0
            assert (got_usage.prompt_tokens, got_usage.completion_tokens) == \
                (want_usage.prompt_tokens, want_usage.completion_tokens)
            assert all(text for text, _ in interactive)
        finally:
            await engine.stop()

    asyncio.run(main())
