"""A batch's line (batch/runner: `api/scope.BATCH_CALLER` in its scope) reaches the engines at
batch priority; every other request at interactive priority (the contract of issue 23 between
the batch runner and the engines' schedulers)."""

from __future__ import annotations

from starlette.requests import Request

from modelyard.api.openai.pipeline import ledgered
from modelyard.api.scope import BATCH_CALLER
from modelyard.engine.types import EmbeddingRequest, EngineRequest
from modelyard.quota.ledger import RequestLedger


def request(batch: bool) -> Request:
    scope = {"type": "http", "method": "POST", "path": "/v1/completions", "headers": [], "state": {}}
    if batch:
        scope[BATCH_CALLER] = "key-1"
    r = Request(scope)
    r.state.ledger = RequestLedger(batch=batch)
    return r


def test_batch_lines_run_at_batch_priority():
    reqs = [EngineRequest(request_id="a", prompt="x"), EngineRequest(request_id="b", prompt="y")]
    assert [r.priority for r in ledgered(request(True), "ep", reqs)] == ["batch", "batch"]
    assert [r.priority for r in ledgered(request(False), "ep", reqs)] == ["interactive", "interactive"]
    # embeddings requests too (local/embeddings_batch.Packer, the remote batch_share)
    [emb] = ledgered(request(True), "ep", [EmbeddingRequest(request_id="e", inputs=("x",))])
    assert emb.ledger is not None and emb.priority == "batch"
    [emb] = ledgered(request(False), "ep", [EmbeddingRequest(request_id="e", inputs=("x",))])
    assert emb.priority == "interactive"
