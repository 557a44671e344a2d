"""The admin API's stored responses (OpenAI's Responses API, control/responses): every key's,
listed by owner, model, status and times (never their content), and deleted (audited). An
inference key sees only its own through /responses; this is the operator's view."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Depends, Query, Request

from ...settings import AdminToken
from .auth import actor, admin, viewer

router = APIRouter()


@router.get("/responses", summary="Stored responses of every key (metadata only), paged by id")
async def list_responses(request: Request, key_id: Annotated[str | None, Query(max_length=256)] = None,
                         limit: Annotated[int, Query(ge=1, le=1000)] = 100,
                         after: Annotated[str | None, Query(max_length=256)] = None,
                         _: AdminToken = Depends(viewer)) -> dict:
    return await request.app.state.responses.run("listed", key_id, limit, after)


@router.delete("/responses/{response_id}", summary="Delete any key's stored response (audited)")
async def delete_response(response_id: str, request: Request, who: AdminToken = Depends(admin)) -> dict:
    await request.app.state.responses.run("remove", actor(who), response_id)
    return {"id": response_id, "object": "response.deleted", "deleted": True}
