"""The Models page: the store's models (its API), pulls and deletes.

A pull runs as a task reading the models API's NDJSON stream (Ollama's shape) into a job the page
polls; at most MAX_PULLS jobs are remembered, finished ones forgotten first.
"""

from __future__ import annotations

import asyncio
import json

from fastapi import APIRouter, Depends, Request
from fastapi.responses import Response

from .. import internal, views
from ..forms import json_body, text
from ..guard import Refusal, changer, reader, who
from ..render import render
from ..session import Session

router = APIRouter(prefix="/console", include_in_schema=False)

MAX_PULLS = 20          # pull jobs remembered (finished ones are dropped first)


@router.get("/models")
async def models_page(request: Request, session: Session = Depends(reader)) -> Response:
    models, notice = await views.models(request.app, who(request, session))
    return render(request, "models.html", session, page="models", models=models, notice=notice,
                  pulls=list(request.app.state.console.pulls.values()))


@router.get("/models/table")
async def models_table(request: Request, session: Session = Depends(reader)) -> Response:
    models, notice = await views.models(request.app, who(request, session))
    return render(request, "_models_table.html", session, models=models, notice=notice)


async def _models_fragment(request: Request, session: Session, flash, status: int = 200) -> Response:
    models, notice = await views.models(request.app, who(request, session))
    return render(request, "_models_table.html", session, status=status, models=models, notice=notice,
                  flash=flash, oob=True)


async def _run_pull(app, token, job: dict) -> None:
    """Reads the models API's NDJSON pull stream (Ollama's shape) into the job the page polls."""
    buffer = b""
    try:
        async for status, chunk in internal.stream(app, token, "POST", views.MODELS_API + "/pull",
                                                   json_body={"model": job["ref"]}):
            job["http_status"] = status
            buffer += chunk
            while b"\n" in buffer:
                line, buffer = buffer.split(b"\n", 1)
                _progress(job, line)
        _progress(job, buffer)
        if job["state"] == "pulling":
            job["state"] = "failed" if job.get("http_status", 200) >= 400 else "done"
    except Exception as exc:  # noqa: BLE001 - the page shows why the pull stopped
        job.update(state="failed", error=f"{type(exc).__name__}: {exc}")


def _progress(job: dict, line: bytes) -> None:
    if not line.strip():
        return
    try:
        event = json.loads(line)
    except ValueError:
        job.update(state="failed", error=line.decode("utf-8", "replace")[:300])
        return
    if not isinstance(event, dict):
        return
    error = event.get("error")
    if error or isinstance(event.get("detail"), list):       # an error line, or a 4xx body before the stream
        message = error.get("message") if isinstance(error, dict) else error
        job.update(state="failed", error=str(message) if message else
                   internal.Answer(job.get("http_status", 400), event).message())
        return
    job["status"] = str(event.get("status", ""))
    if isinstance(event.get("total"), int) and event["total"] > 0:
        job["total"] = event["total"]
        job["completed"] = int(event.get("completed") or 0)
    if event.get("status") == "success":
        job["state"] = "done"


@router.post("/models/pull")
async def pull_model(request: Request, session: Session = Depends(changer)) -> Response:
    body = await json_body(request)
    ref = text(body, "ref")
    if ref is None:
        return await _models_fragment(request, session, ("error", "ref is required: a model reference to pull"), 422)
    state = request.app.state.console
    job = {"id": f"pull{next(state.pull_ids)}", "ref": ref, "state": "pulling", "status": "starting",
           "completed": 0, "total": None, "error": None}
    for old in [j for j in state.pulls.values() if j["state"] != "pulling"][:max(0, len(state.pulls) - MAX_PULLS + 1)]:
        state.pulls.pop(old["id"], None)
    state.pulls[job["id"]] = job
    task = asyncio.create_task(_run_pull(request.app, who(request, session), job), name=f"console-pull:{ref}")
    state.tasks.add(task)
    task.add_done_callback(state.tasks.discard)
    return render(request, "_pull.html", session, job=job)


@router.get("/models/pulls/{job_id}")
async def pull_progress(job_id: str, request: Request, session: Session = Depends(reader)) -> Response:
    job = request.app.state.console.pulls.get(job_id)
    if job is None:
        raise Refusal(404, f"no pull {job_id!r} (the console forgets finished pulls after a while)")
    response = render(request, "_pull.html", session, job=job)
    if job["state"] != "pulling":
        response.headers["HX-Trigger"] = "models-changed"
    return response


@router.post("/models/delete")
async def delete_model(request: Request, session: Session = Depends(changer)) -> Response:
    body = await json_body(request)
    ref = text(body, "ref")
    if ref is None:
        return await _models_fragment(request, session, ("error", "ref is required: the model reference to delete"),
                                      422)
    answer = await internal.call(request.app, who(request, session), "DELETE", f"{views.MODELS_API}/{ref}")
    flash = ("ok", f"Deleted {ref}.") if answer.ok else ("error", f"Refused ({answer.status}): {answer.message()}")
    return await _models_fragment(request, session, flash)
