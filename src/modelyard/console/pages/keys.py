"""The Keys page: inference keys with their status, last use and 24 h usage; create (the secret
shown once), Rotate (the old secret works an hour more), Rotate now, Revoke: each through the keys API.
"""

from __future__ import annotations

import time
from typing import Any

from fastapi import APIRouter, Depends, Request
from fastapi.responses import Response

from .. import internal, views
from ..forms import FieldError, json_body, listed, text, whole
from ..guard import changer, one_of, reader, who
from ..render import render
from ..session import Session

router = APIRouter(prefix="/console", include_in_schema=False)


async def _keys_fragment(request: Request, session: Session, status: int = 200, flash=None,
                         secret: dict | None = None) -> Response:
    got = await views.keys(request.app, who(request, session))
    if isinstance(got, internal.Answer):
        return render(request, "_keys.html", session, status=status, keys=[], oob=True, secret=None,
                      flash=("error", f"the keys API answered {got.status}: {got.message()}"))
    return render(request, "_keys.html", session, status=status, keys=got, secret=secret, flash=flash, oob=True)


@router.get("/keys")
async def keys_page(request: Request, session: Session = Depends(reader)) -> Response:
    got = await views.keys(request.app, who(request, session))
    notice = f"the keys API answered {got.status}: {got.message()}" if isinstance(got, internal.Answer) else None
    return render(request, "keys.html", session, page="keys", keys=[] if notice else got, notice=notice,
                  secret=None, endpoint_names=sorted(request.app.state.registry.endpoints))


@router.post("/keys")
async def create_key(request: Request, session: Session = Depends(changer)) -> Response:
    body = await json_body(request)
    try:
        fields: dict[str, Any] = {"name": text(body, "name", required=True),
                                  "rpm": whole(body, "rpm", 1, 10 ** 9), "tpm": whole(body, "tpm", 1, 10 ** 12),
                                  "endpoints": listed(body, "endpoints")}
        hours = whole(body, "expires_hours", 1, 24 * 366)
        if hours is not None:
            fields["expires_at"] = int(time.time()) + hours * 3600
    except FieldError as exc:
        return await _keys_fragment(request, session, status=422, flash=("error", str(exc)))
    answer = await internal.call(request.app, who(request, session), "POST", "/api-keys",
                                 json_body={k: v for k, v in fields.items() if v is not None})
    if not answer.ok:
        return await _keys_fragment(request, session, status=answer.status if answer.status < 500 else 502,
                                    flash=("error", f"Refused ({answer.status}): {answer.message()}"))
    return await _keys_fragment(request, session, flash=("ok", f"Key {answer.body['name']!r} created."),
                                secret={"id": answer.body["id"], "name": answer.body["name"],
                                        "value": answer.body["secret"]})


ROTATE_GRACE = {"rotate": 3600, "rotate-now": 0}     # seconds the old secret keeps working


@router.post("/keys/{key_id}/{action}")
async def key_action(key_id: str, request: Request,
                     action: str = Depends(one_of("key", "revoke", "rotate", "rotate-now")),
                     session: Session = Depends(changer)) -> Response:
    # rotate: the old secret keeps working for an hour (clients switch without an outage);
    # rotate-now: grace 0, for a secret that leaked, which must stop working at once
    body = {"grace_seconds": ROTATE_GRACE[action]} if action in ROTATE_GRACE else None
    answer = await internal.call(request.app, who(request, session), "POST",
                                 f"/api-keys/{key_id}/{action.removesuffix('-now')}", json_body=body)
    if not answer.ok:
        return await _keys_fragment(request, session, flash=("error", f"Refused ({answer.status}): {answer.message()}"))
    if action in ROTATE_GRACE:
        after = "the old secret works for an hour" if ROTATE_GRACE[action] else "the old secret no longer works"
        return await _keys_fragment(
            request, session, flash=("ok", f"Key {answer.body['name']!r} rotated; {after}."),
            secret={"id": answer.body["id"], "name": answer.body["name"], "value": answer.body["secret"]})
    return await _keys_fragment(request, session, flash=("ok", f"Key {answer.body['name']!r} revoked."))
