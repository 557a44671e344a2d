"""OpenAI's Batch API: `POST /batches`, `GET /batches` (paged), `GET /batches/{id}`,
`POST /batches/{id}/cancel`. The store is control/batches; the lines run in batch/runner.

Creating a batch validates its input file here, line by line (control/batches.parse_lines),
with the caller's view of the endpoints: a model the key may not use is an unknown one, a model
of the other kind (an embeddings model for /v1/chat/completions) is refused. A file with any bad
line makes a `failed` batch listing the lines' errors, as OpenAI's does; a good one is
`in_progress`, and every gateway's runner takes its lines from there.
"""

from __future__ import annotations

import asyncio
from typing import Literal

from fastapi import APIRouter, Query, Request
from pydantic import Field

from ...control.batches import VALIDATING
from ...engine.types import ModelType
from ...errors import ModelyardError
from ..auth import find_endpoint
from ..strict import StrictBody
from .response_schemas import Metadata
from .responses import key_id

router = APIRouter()
Endpoint = Literal["/v1/chat/completions", "/v1/completions", "/v1/embeddings", "/v1/responses"]


class BatchCreate(StrictBody):
    input_file_id: str = Field(max_length=256)
    endpoint: Endpoint
    completion_window: Literal["24h"]
    metadata: Metadata | None = None


async def store(request: Request):
    return await request.app.state.batches.store()


def model_check(request: Request, endpoint: str):
    """(code, message) for a model this caller may not use at `endpoint`, else None."""
    wanted = ModelType.EMBEDDINGS if endpoint == "/v1/embeddings" else ModelType.COMPLETIONS

    def check(model: str) -> tuple[str, str] | None:
        try:
            find_endpoint(request, model).require_type(wanted, endpoint.removeprefix("/v1"))
        except ModelyardError as exc:
            return (exc.code or "model_not_found"), exc.message
        return None
    return check


@router.post("/batches", summary="Create a batch from an uploaded file")
async def create_batch(body: BatchCreate, request: Request) -> dict:
    owner = await key_id(request)
    batches = await store(request)
    runner = request.app.state.batches
    settings = request.app.state.settings
    created = await asyncio.to_thread(batches.create, owner, body.input_file_id, body.endpoint, body.metadata,
                                      max(runner.lease, VALIDATING))
    # the lines checked while this gateway holds the batch's lease (one that dies meanwhile
    # leaves it to the next runner, which fails it: control/batches.take)
    await asyncio.to_thread(batches.validate, created["id"], body.endpoint, model_check(request, body.endpoint),
                            settings.max_batch_lines, settings.limits.max_body_bytes)
    runner.wake()
    return await asyncio.to_thread(batches.get, owner, created["id"])


@router.get("/batches", summary="List the caller's batches, newest first")
async def list_batches(request: Request, limit: int = Query(20, ge=1, le=100),
                       after: str | None = Query(None, max_length=256)) -> dict:
    owner = await key_id(request)
    return await asyncio.to_thread((await store(request)).listed, owner, limit, after)


@router.get("/batches/{batch_id}", summary="Retrieve a batch")
async def get_batch(batch_id: str, request: Request) -> dict:
    owner = await key_id(request)
    return await asyncio.to_thread((await store(request)).get, owner, batch_id)


@router.post("/batches/{batch_id}/cancel", summary="Cancel a batch")
async def cancel_batch(batch_id: str, request: Request) -> dict:
    owner = await key_id(request)
    answer = await asyncio.to_thread((await store(request)).cancel, owner, batch_id)
    await request.app.state.batches.stop_batch(batch_id)       # its lines running here, now
    return answer
