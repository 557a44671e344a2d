"""The Live page: per endpoint, server-side SVG charts of the sampler's last five minutes
(console/sampler, console/charts), the charts fragment re-polled by htmx.
"""

from __future__ import annotations

from fastapi import APIRouter, Depends, Request
from fastapi.responses import Response

from ..charts import chart
from ..guard import reader
from ..render import render
from ..session import Session

router = APIRouter(prefix="/console", include_in_schema=False)

SPAN = 300.0
CHARTS = (("requests", "requests/s", ""), ("tokens", "tokens/s", ""), ("ttft", "TTFT (mean)", "s"),
          ("queue", "queue depth", ""), ("throttled", "429s/s", ""), ("errors", "errors (5xx)/s", ""))


def _charts(request: Request) -> list[dict]:
    sampler = request.app.state.console.sampler
    out = []
    for name in sorted(request.app.state.registry.endpoints):
        series = sampler.series(name)
        out.append({"name": name, "charts": [chart(series[key], title, unit, SPAN) for key, title, unit in CHARTS]})
    return out


@router.get("/live")
async def live_page(request: Request, session: Session = Depends(reader)) -> Response:
    return render(request, "live.html", session, page="live", endpoints=_charts(request))


@router.get("/live/charts")
async def live_charts(request: Request, session: Session = Depends(reader)) -> Response:
    return render(request, "_live_charts.html", session, endpoints=_charts(request))
