"""The Batches page: every key's batches (OpenAI's Batch API) with status, progress
(request_counts), their output and error files to download, and Cancel: each through the
control plane's batches routes (`/batches`, `/batches/{id}/cancel`, `/files/{id}/content`).
"""

from __future__ import annotations

import json
from typing import Annotated

from fastapi import APIRouter, Depends, Path, Request
from fastapi.responses import Response, StreamingResponse

from .. import internal, views
from ..guard import Refusal, changer, reader, who
from ..render import render
from ..session import Session

router = APIRouter(prefix="/console", include_in_schema=False)
# ids go into the API's path: letters, digits, - and _ only (OpenAI's batch_... and file-...)
ObjectId = Annotated[str, Path(min_length=1, max_length=200, pattern=r"^[A-Za-z0-9_-]+$")]


async def _fragment(request: Request, session: Session, flash=None) -> Response:
    rows, notice = await views.batches(request.app, who(request, session))
    return render(request, "_batches.html", session, batches=rows, notice=notice, flash=flash, oob=True)


@router.get("/batches")
async def batches_page(request: Request, session: Session = Depends(reader)) -> Response:
    rows, notice = await views.batches(request.app, who(request, session))
    return render(request, "batches.html", session, page="batches", batches=rows, notice=notice)


@router.get("/batches/table")
async def batches_table(request: Request, session: Session = Depends(reader)) -> Response:
    """The table alone, which the page re-polls while a batch runs."""
    return await _fragment(request, session)


@router.post("/batches/{batch_id}/cancel")
async def cancel_batch(batch_id: ObjectId, request: Request, session: Session = Depends(changer)) -> Response:
    answer = await internal.call(request.app, who(request, session), "POST", f"/batches/{batch_id}/cancel")
    if not answer.ok:
        return await _fragment(request, session, flash=("error", f"Refused ({answer.status}): {answer.message()}"))
    return await _fragment(request, session, flash=("ok", f"Batch {batch_id} is {answer.body.get('status')}."))


@router.get("/files/{file_id}/content")
async def download_file(file_id: ObjectId, request: Request, session: Session = Depends(reader)) -> Response:
    """A batch's output or error file, streamed from the files API as it reads it (never whole
    in memory here)."""
    chunks = internal.stream(request.app, who(request, session), "GET", f"/files/{file_id}/content")
    status, first = await chunks.__anext__()
    if status != 200:
        body = first + b"".join([c async for _, c in chunks])
        message = internal.Answer(status, _json(body)).message()
        raise Refusal(status if status < 500 else 502, f"the files API answered {status}: {message}")

    async def rest():
        if first:
            yield first
        async for _, chunk in chunks:
            yield chunk
    return StreamingResponse(rest(), media_type="application/jsonl", headers={
        "Content-Disposition": f'attachment; filename="{file_id}.jsonl"'})


def _json(raw: bytes):
    try:
        return json.loads(raw)
    except ValueError:
        return raw.decode("utf-8", "replace")
