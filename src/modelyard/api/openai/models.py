"""GET /models: OpenAI's list of models, here the model endpoints this caller may use, with
modelyard's `model_type`, `model_engine`, state and readiness."""

from __future__ import annotations

from fastapi import APIRouter, Request

from ...registry.endpoint import EndpointState
from ..auth import seen_endpoints

router = APIRouter()        # under the OpenAI prefixes, behind auth


@router.get("/models", summary="List model endpoints")
async def list_models(request: Request) -> dict:
    return {"object": "list", "data": [
        {"id": ep.name, "object": "model.deleted" if ep.state is EndpointState.DELETING else "model",
         "created": request.app.state.started, "owned_by": "modelyard",
         "model_type": ep.model_type.value if ep.model_type else None, "model_engine": ep.model_engine,
         "state": ep.state.value, "ready": ep.serving_reason() is None}
        for ep in seen_endpoints(request)]}
