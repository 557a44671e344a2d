"""The admin API's files and batches (OpenAI's Files and Batch APIs, control/files,
control/batches): every key's, listed with their owner. An inference key sees only its own
through /files and /batches; this is the operator's view: lists for viewers, a file's bytes
and cancelling for admins (the console's Batches page), the cancel audited."""

from __future__ import annotations

import asyncio
from typing import Annotated, Literal

from fastapi import APIRouter, Depends, Path, Query, Request
from fastapi.responses import Response

from ...settings import AdminToken
from ..openai.files import streamed
from .auth import actor, admin, viewer

router = APIRouter()


@router.get("/files", summary="Uploaded and batch output files of every key, paged by id")
async def list_files(request: Request, key_id: Annotated[str | None, Query(max_length=256)] = None,
                     purpose: Annotated[str | None, Query(max_length=64)] = None,
                     limit: Annotated[int, Query(ge=1, le=1000)] = 100,
                     after: Annotated[str | None, Query(max_length=256)] = None,
                     order: Literal["asc", "desc"] = "asc", _: AdminToken = Depends(viewer)) -> dict:
    files = (await request.app.state.batches.store()).files
    return await asyncio.to_thread(files.listed, key_id, purpose, limit, after, order, True)


@router.get("/batches", summary="Batches of every key, newest first")
async def list_batches(request: Request, key_id: Annotated[str | None, Query(max_length=256)] = None,
                       limit: Annotated[int, Query(ge=1, le=1000)] = 100,
                       after: Annotated[str | None, Query(max_length=256)] = None,
                       _: AdminToken = Depends(viewer)) -> dict:
    batches = await request.app.state.batches.store()
    return await asyncio.to_thread(batches.listed, key_id, limit, after, True)


@router.get("/files/{file_id}/content", summary="Any key's file, its bytes (admin role)")
async def file_content(file_id: Annotated[str, Path(max_length=256)], request: Request,
                       _: AdminToken = Depends(admin)) -> Response:
    files = (await request.app.state.batches.store()).files
    return await streamed(files, await asyncio.to_thread(files.owner_of, file_id), file_id)


@router.post("/batches/{batch_id}/cancel", summary="Cancel any key's batch (audited)")
async def cancel_batch(batch_id: Annotated[str, Path(max_length=256)], request: Request,
                       who: AdminToken = Depends(admin)) -> dict:
    answer = await asyncio.to_thread((await request.app.state.batches.store()).cancel_any, actor(who), batch_id)
    await request.app.state.batches.stop_batch(batch_id)       # its lines running here, now
    return answer
