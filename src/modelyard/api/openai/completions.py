"""POST /completions: validated body -> EngineRequests -> the shared pipeline (api/openai/pipeline)."""

from __future__ import annotations

import time
import uuid

from fastapi import APIRouter, Request
from fastapi.responses import Response

from ...engine.types import EngineRequest
from .cache_scope import cache_partition
from .pipeline import ERRORS, respond, sampling_params
from .schemas import CompletionRequest, CompletionResponse
from .streaming import Completion

router = APIRouter()

DEFAULT_MAX_TOKENS = 16     # OpenAI's default for completions (chat's is the room left in the context)


def engine_requests(body: CompletionRequest, cmpl_id: str, deadline: float | None,
                    partition: str = "") -> list[EngineRequest]:
    sampling = sampling_params(body, body.logprobs)
    return [EngineRequest(request_id=f"{cmpl_id}-{i}", prompt=prompt, sampling=sampling, n=body.n or 1,
                          max_tokens=body.max_tokens or DEFAULT_MAX_TOKENS, stop=body.stops,
                          echo=bool(body.echo), deadline=deadline, constraint=body.structured,
                          cache_partition=partition)
            for i, prompt in enumerate(body.prompts)]


@router.post("/completions", response_model=CompletionResponse, responses=ERRORS,
             summary="Create Completion")
async def create_completion(body: CompletionRequest, request: Request) -> Response:
    """Given a prompt, returns one or more predicted completions, optionally with the
    probabilities of alternative tokens at each position."""
    out = Completion(f"cmpl-{uuid.uuid4().hex}", int(time.time()), body.model, body.n or 1)
    return await respond(request, body, out, logprobs=body.logprobs, prompts=len(body.prompts),
                         build=lambda deadline: engine_requests(body, out.id, deadline,
                                                                cache_partition(request, body.cache_salt)))
