"""The admin API's usage: requests and tokens per key and endpoint, by minute, hour or day,
paged; what the request ledgers recorded (quota/ledger, control/usage)."""

from __future__ import annotations

import asyncio
from typing import Annotated

from fastapi import APIRouter, Depends, Query, Request

from ...control.usage import USAGE_PAGE, USAGE_PAGE_MAX, query as usage_query
from ...settings import AdminToken
from .auth import viewer

router = APIRouter()


@router.get("/usage", summary="Requests and tokens per key and endpoint, by minute, hour or day")
async def usage(request: Request, granularity: Annotated[str, Query(pattern="^(minute|hour|day)$")] = "hour",
                key_id: str | None = None, endpoint: str | None = None,
                start: Annotated[int | None, Query(ge=0)] = None, end: Annotated[int | None, Query(ge=0)] = None,
                limit: Annotated[int, Query(ge=1, le=USAGE_PAGE_MAX)] = USAGE_PAGE,
                after: Annotated[str | None, Query(max_length=1000)] = None,
                _: AdminToken = Depends(viewer)) -> dict:
    """Paged like the other lists (`limit`, `after` = the last page's `last_id`): one answer was
    every row ever stored for a viewer's `start=0`."""
    return await asyncio.to_thread(usage_query, request.app.state.key_store.db, granularity, key_id, endpoint, start, end,
                                   limit, after)
