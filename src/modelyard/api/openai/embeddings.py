"""POST /embeddings: validated body -> one EmbeddingRequest -> the endpoint's engine -> OpenAI's
list of vectors, as floats or (the official client's default) base64 of little-endian float32.

Same rules as /completions (api/openai/pipeline): settings limits as 422s, 404 unknown endpoint, 400
for an endpoint of the other kind or not ready, the key's tpm quota on prompt tokens, the
request's deadline, and a client that leaves cancels the work.
"""

from __future__ import annotations

import base64
import json
import math
import struct
import uuid

from fastapi import APIRouter, Request
from fastapi.responses import Response

from ...engine.types import EmbeddingRequest, EmbeddingResult, ModelType
from ...errors import EngineError
from ..errors import limit_error
from .pipeline import ERRORS, deadline_for, ledgered, ready_engine
from .schemas import CreateEmbeddingRequest, CreateEmbeddingResponse

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
    engine = await ready_engine(request, body.model, ModelType.EMBEDDINGS, body.keep_alive)
    [req] = ledgered(request, body.model, [EmbeddingRequest(f"embd-{uuid.uuid4().hex}", inputs, body.dimensions,
                                                            bool(body.truncate), deadline)])
    result = await engine.embed(req)      # a client that leaves cancels it (api/middleware/disconnect)
    if len(result.vectors) != len(inputs):
        raise EngineError(f"the engine returned {len(result.vectors)} vectors for {len(inputs)} inputs")
    state.metrics.embedding(body.model, len(inputs))
    request.state.log = {"id": req.request_id, "inputs": len(inputs), "prompt_tokens": result.prompt_tokens}
    return Response(response_body(body.model, result, body.encoding_format or "float"), media_type="application/json")


def response_body(model: str, result: EmbeddingResult, encoding: str) -> bytes:
    """OpenAI's body, written directly: json.dumps writes each float32 value as the 17 digits
    of a float64 repr, 3x slower (~30 ms for 64 x 384 values on a shared 2-core machine) and a
    half longer than the 9 digits that carry a float32 exactly."""
    encode = as_base64 if encoding == "base64" else as_floats
    data = ",".join(f'{{"object":"embedding","index":{i},"embedding":{encode(v)}}}'
                    for i, v in enumerate(result.vectors))
    n = result.prompt_tokens
    return (f'{{"object":"list","data":[{data}],"model":{json.dumps(model)},'
            f'"usage":{{"prompt_tokens":{n},"total_tokens":{n}}}}}').encode()


def as_floats(vector: tuple[float, ...]) -> str:
    """A JSON array of the vector's float32 values, 9 significant digits each: what any float32
    needs to come back bit for bit (FLT_DECIMAL_DIG): float32(the parsed number) is the value."""
    if 0.0 in vector:     # "%g" writes -0.0 as "-0", which JSON readers take for the integer 0
        text = "[" + ",".join("-0.0" if x == 0 and math.copysign(1.0, x) < 0 else "%.9g" % x for x in vector) + "]"
    else:
        text = "[" + ",".join(["%.9g"] * len(vector)) % tuple(vector) + "]"
    if "n" in text:      # nan or inf, which JSON cannot carry: an engine bug, never sent as a body
        raise EngineError("the engine returned a vector that is not finite")
    return text


def as_base64(vector: tuple[float, ...]) -> str:
    """OpenAI's base64 encoding, as a JSON string: the vector's float32 values, little-endian,
    base64 (what the official client decodes with numpy.frombuffer(..., dtype="float32"))."""
    return '"' + base64.b64encode(struct.pack(f"<{len(vector)}f", *vector)).decode("ascii") + '"'
