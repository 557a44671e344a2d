"""The one place where our error tree becomes HTTP."""

from __future__ import annotations

import logging

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException

from ..errors import ModelyardError
from .auth import may_see_reasons

log = logging.getLogger("modelyard.api")


def error_response(exc: ModelyardError, detail: bool = False) -> JSONResponse:
    """The error's body; its detail (why an endpoint is not ready) only if `detail`."""
    headers = {"Retry-After": str(max(1, round(exc.retry_after)))} if exc.retry_after is not None else None
    return JSONResponse(exc.body(detail), status_code=exc.status, headers=headers)


def limit_error(field: str, value: object, limit: int, what: str) -> RequestValidationError:
    """A settings limit broken by a body field, reported like any other 422 on that field."""
    return RequestValidationError([{
        "loc": ("body", field), "type": "less_than_equal", "input": value, "ctx": {"le": limit},
        "msg": f"{what} is {value}, above this server's limit of {limit}"}])


def install(app: FastAPI) -> None:
    @app.exception_handler(ModelyardError)
    async def _ours(request: Request, exc: ModelyardError) -> JSONResponse:
        return error_response(exc, may_see_reasons(request))

    @app.exception_handler(HTTPException)
    async def _http(request: Request, exc: HTTPException) -> JSONResponse:
        # Starlette's and FastAPI's own errors (unknown route 404, wrong method 405, a body that
        # is not UTF-8 400) in OpenAI's shape rather than {"detail": "<string>"}.
        kind = "not_found_error" if exc.status_code == 404 else (
            "server_error" if exc.status_code >= 500 else "invalid_request_error")
        return JSONResponse({"error": {"message": str(exc.detail), "type": kind, "param": None, "code": None}},
                            status_code=exc.status_code, headers=getattr(exc, "headers", None))

    @app.exception_handler(Exception)
    async def _bug(request: Request, exc: Exception) -> JSONResponse:
        log.exception("unhandled error on %s", request.url.path)
        return JSONResponse({"error": {"message": f"internal error: {type(exc).__name__}",
                                       "type": "server_error", "param": None, "code": None}},
                            status_code=500)

    # Malformed JSON and schema errors keep FastAPI's own 422 body: {"detail": [...]}.
