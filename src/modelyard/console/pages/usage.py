"""The Usage page and its CSV: tokens per key and endpoint per hour or day, from the usage
rollups (never request logs); the CSV's cells are neutralised for spreadsheets (console/views).
"""

from __future__ import annotations

from fastapi import APIRouter, Depends, Request
from fastapi.responses import Response

from .. import views
from ..guard import Refusal, reader, who
from ..render import render
from ..session import Session

router = APIRouter(prefix="/console", include_in_schema=False)


def _usage_query(request: Request) -> tuple[str, int]:
    granularity = request.query_params.get("granularity", "day")
    if granularity not in ("hour", "day"):
        granularity = "day"
    try:
        days = min(max(int(request.query_params.get("days", "7")), 1), 90)
    except ValueError:
        days = 7
    return granularity, days


@router.get("/usage")
async def usage_page(request: Request, session: Session = Depends(reader)) -> Response:
    granularity, days = _usage_query(request)
    rows, notice = await views.usage(request.app, who(request, session), granularity, days)
    return render(request, "usage.html", session, page="usage", rows=rows, notice=notice,
                  granularity=granularity, days=days)


@router.get("/usage.csv")
async def usage_csv(request: Request, session: Session = Depends(reader)) -> Response:
    granularity, days = _usage_query(request)
    rows, notice = await views.usage(request.app, who(request, session), granularity, days)
    if notice:
        raise Refusal(502, notice)
    return Response(views.usage_csv(rows), media_type="text/csv; charset=utf-8", headers={
        "Content-Disposition": f'attachment; filename="modelyard-usage-{granularity}-{days}d.csv"'})
