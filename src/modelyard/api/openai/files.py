"""OpenAI's Files API: `POST /files` (multipart: `file`, `purpose` "batch" or "user_data"),
`GET /files` (paged: limit, after, purpose, order), `GET`/`DELETE /files/{id}`,
`GET /files/{id}/content`. Stored in the control database (control/files), owned by the key
that uploaded (another key: 404).

An upload never sits in memory: api/middleware/body_limits gives this route alone a bound of
`[server] max_file_bytes` (plus room for the form's other fields) and cuts the body at it as it
streams in (a Content-Length above it is refused unread); Starlette's multipart parser spools
the file part to a temporary file past 1 MiB, and control/files copies it a chunk at a time.
"""

from __future__ import annotations

import asyncio
from typing import Literal

from fastapi import APIRouter, Query, Request
from fastapi.responses import Response, StreamingResponse
from starlette.datastructures import UploadFile

from ...control.files import PURPOSES
from ...errors import InvalidRequest
from ..middleware.body_limits import TooLarge
from .responses import key_id

router = APIRouter()
FORM_ROOM = 64 * 1024         # bytes of a multipart body besides the file (boundaries, purpose)
MAX_FILENAME = 512


def upload_limit(max_file_bytes: int) -> int:
    """The body bound of the upload route (api/app gives it to BodyLimits)."""
    return max_file_bytes + FORM_ROOM


async def store(request: Request):
    """control/files.FileStore of this server's database (batch/runner opens it on first use)."""
    return (await request.app.state.batches.store()).files


@router.post("/files", summary="Upload a file (multipart: file, purpose)")
async def upload(request: Request) -> dict:
    settings = request.app.state.settings
    if not request.headers.get("content-type", "").startswith("multipart/form-data"):
        raise InvalidRequest("an upload is multipart/form-data with the fields 'file' and 'purpose'", param="file")
    try:
        form = await request.form(max_files=1, max_fields=8, max_part_size=FORM_ROOM)
    except TooLarge:
        # over the route's bound while streaming in: BodyLimits answers its 413 instead of this
        return Response(status_code=413)
    try:
        purpose, file = form.get("purpose"), form.get("file")
        if not isinstance(purpose, str) or purpose not in PURPOSES:
            raise InvalidRequest(f"purpose must be one of {list(PURPOSES)}, got {str(purpose)[:50]!r}",
                                 param="purpose")
        if not isinstance(file, UploadFile):
            raise InvalidRequest("the form has no file in its 'file' field", param="file")
        filename = file.filename or "upload"
        if len(filename) > MAX_FILENAME:
            raise InvalidRequest(f"the file's name is {len(filename)} characters, above the limit of {MAX_FILENAME}",
                                 param="file")
        owner = await key_id(request)
        files = await store(request)
        return await asyncio.to_thread(files.upload, owner, purpose, filename, file.file, settings.max_file_bytes,
                                       settings.max_batch_lines)
    finally:
        await form.close()


@router.get("/files", summary="List the caller's files")
async def list_files(request: Request, limit: int = Query(10_000, ge=1, le=10_000),
                     after: str | None = Query(None, max_length=256),
                     purpose: str | None = Query(None, max_length=64),
                     order: Literal["asc", "desc"] = "desc") -> dict:
    owner = await key_id(request)
    return await asyncio.to_thread((await store(request)).listed, owner, purpose, limit, after, order)


@router.get("/files/{file_id}", summary="Retrieve a file's record")
async def get_file(file_id: str, request: Request) -> dict:
    owner = await key_id(request)
    return await asyncio.to_thread((await store(request)).get, owner, file_id)


@router.delete("/files/{file_id}", summary="Delete a file")
async def delete_file(file_id: str, request: Request) -> dict:
    owner = await key_id(request)
    await asyncio.to_thread((await store(request)).delete, owner, file_id)
    return {"id": file_id, "object": "file", "deleted": True}


@router.get("/files/{file_id}/content", summary="A file's bytes")
async def file_content(file_id: str, request: Request) -> Response:
    return await streamed(await store(request), await key_id(request), file_id)


async def streamed(files, owner: str | None, file_id: str) -> Response:
    """A file's bytes as a response: every chunk read and checked against the sha256 first (a
    damaged file is an error, never sent), then sent a chunk at a time (checked again as it goes).
    The admin API's download of any key's file answers the same way."""
    row = await asyncio.to_thread(files.verified, owner, file_id)
    chunks = files.chunks(row)

    async def body():
        while (piece := await asyncio.to_thread(next, chunks, None)) is not None:
            yield piece
    return StreamingResponse(body(), media_type="application/octet-stream",
                             headers={"content-length": str(row["bytes"]),
                                      "content-disposition": f'attachment; filename="{row["id"]}.jsonl"'})
