"""POST /embeddings: validated body -> one EmbeddingRequest -> the endpoint's engine -> OpenAI's
list of vectors, as floats or (the official client's default) base64 of little-endian float32.

Same rules as /completions (api/pipeline): settings limits as 422s, 404 unknown endpoint, 400
for an endpoint of the other kind or not ready, the key's tpm quota on prompt tokens, the
request's deadline, and a client that leaves cancels the work.
"""

from __future__ import annotations

import asyncio
import base64
import struct
import uuid

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, Response

from ..engine.types import EmbeddingRequest, EmbeddingResult, ModelType
from ..errors import EngineError
from .errors import limit_error
from .pipeline import ERRORS, charge_unmetered, deadline_for, metered, ready_engine
from .schemas import CreateEmbeddingRequest, CreateEmbeddingResponse
from .streaming import unless_disconnected

router = APIRouter()


@router.post("/embeddings", response_model=CreateEmbeddingResponse, responses=ERRORS,
             summary="Create Embeddings")
async def create_embeddings(body: CreateEmbeddingRequest, request: Request) -> Response:
    """Embeds each input separately (its vector never depends on the others) with the
    endpoint's embedding model."""
    state = request.app.state
    request.state.endpoint = body.model
    inputs = body.inputs
    limit = state.settings.limits.max_embedding_inputs
    if len(inputs) > limit:
        raise limit_error("input", len(inputs), limit, "the number of inputs")
    deadline = deadline_for(request)
    engine = ready_engine(request, body.model, ModelType.EMBEDDINGS)
    [req] = metered(request, [EmbeddingRequest(f"embd-{uuid.uuid4().hex}", inputs, body.dimensions,
                                               bool(body.truncate), deadline)])
    result = await unless_disconnected(request, asyncio.ensure_future(engine.embed(req)))
    if result is None:   # the client left; nobody will read this
        return Response(status_code=499)
    if len(result.vectors) != len(inputs):
        raise EngineError(f"the engine returned {len(result.vectors)} vectors for {len(inputs)} inputs")
    state.metrics.embedding(body.model, len(inputs), result.prompt_tokens)
    charge_unmetered(request, result.prompt_tokens)
    request.state.log = {"id": req.request_id, "inputs": len(inputs), "prompt_tokens": result.prompt_tokens}
    return JSONResponse(response_body(body.model, result, body.encoding_format or "float"))


def response_body(model: str, result: EmbeddingResult, encoding: str) -> dict:
    encode = as_base64 if encoding == "base64" else list
    return {"object": "list", "model": model,
            "data": [{"object": "embedding", "index": i, "embedding": encode(v)} for i, v in enumerate(result.vectors)],
            "usage": {"prompt_tokens": result.prompt_tokens, "total_tokens": result.prompt_tokens}}


def as_base64(vector: tuple[float, ...]) -> str:
    """OpenAI's base64 encoding: the vector's float32 values, little-endian, base64 (what the
    official client decodes with numpy.frombuffer(..., dtype="float32"))."""
    return base64.b64encode(struct.pack(f"<{len(vector)}f", *vector)).decode("ascii")
