"""The Playground page: its endpoints, and a short-lived inference key for the page's own calls
(the browser calls /v1 with it, as any client would: static/console.js).
"""

from __future__ import annotations

import time

from fastapi import APIRouter, Depends, Request
from fastapi.responses import Response

from ...registry.endpoint import EndpointState
from .. import internal
from ..guard import changer, reader, who
from ..render import render
from ..session import Session

router = APIRouter(prefix="/console", include_in_schema=False)

PLAYGROUND_KEY_SECONDS = 3600


@router.get("/playground")
async def playground_page(request: Request, session: Session = Depends(reader)) -> Response:
    eps = [{"name": ep.name, "kind": ep.model_type.value.lower() if ep.model_type else "completions",
            "ready": ep.state is EndpointState.READY}
           for ep in sorted(request.app.state.registry.endpoints.values(), key=lambda e: e.name)]
    return render(request, "playground.html", session, page="playground", endpoints=eps)


@router.post("/playground/key")
async def playground_key(request: Request, session: Session = Depends(changer)) -> Response:
    """A short-lived inference key for the playground (an ordinary stored key: audited, metered,
    revocable), its secret into the page's key field."""
    answer = await internal.call(request.app, who(request, session), "POST", "/api-keys", json_body={
        "name": f"console playground ({session.name})", "expires_at": int(time.time()) + PLAYGROUND_KEY_SECONDS})
    if not answer.ok:
        return render(request, "_playground_key.html", session, secret=None,
                      flash=("error", f"Refused ({answer.status}): {answer.message()}"), oob=True)
    return render(request, "_playground_key.html", session, secret=answer.body["secret"],
                  flash=("ok", f"Key {answer.body['id']} made; it expires in an hour."), oob=True)
