"""The admin API's files and batches (OpenAI's Files and Batch APIs, control/files,
control/batches): every key's, listed with their owner. An inference key sees only its own
through /files and /batches; this is the operator's view."""

from __future__ import annotations

import asyncio
from typing import Annotated, Literal

from fastapi import APIRouter, Depends, Query, Request

from ...settings import AdminToken
from .auth import viewer

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
