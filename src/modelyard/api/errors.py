"""The one place where our error tree becomes HTTP."""

from __future__ import annotations

import logging

from fastapi import FastAPI, Request
from fastapi.encoders import jsonable_encoder
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException

from ..errors import ModelyardError
from .auth import may_see_reasons

log = logging.getLogger("modelyard.api")


# Anthropic's API (api/anthropic) answers errors in its own shape; every other route in OpenAI's.
ANTHROPIC_PATHS = ("/v1/messages", "/v1/messages/count_tokens")
ANTHROPIC_TYPES = {400: "invalid_request_error", 401: "authentication_error", 403: "permission_error",
                   404: "not_found_error", 413: "request_too_large", 429: "rate_limit_error",
                   503: "overloaded_error", 529: "overloaded_error"}


def responses_path(path: str) -> bool:
    """OpenAI's Responses and Conversations APIs (api/openai/responses, conversations), which
    refuse unknown fields with a 400."""
    return path.endswith(("/v1/responses", "/v1/responses/input_tokens")) or "/v1/conversations" in path


def unknown_parameters(errors: list[dict]) -> JSONResponse | None:
    """OpenAI's 400 for fields it does not know, naming them (its own message and code)."""
    unknown = [".".join(str(p) for p in e.get("loc", ())[1:]) for e in errors if e.get("type") == "extra_forbidden"]
    if not unknown:
        return None
    names = ", ".join(f"'{u}'" for u in unknown[:MAX_ERRORS])
    return JSONResponse({"error": {"message": f"Unknown parameter{'s' if len(unknown) > 1 else ''}: {names}.",
                                   "type": "invalid_request_error", "param": unknown[0],
                                   "code": "unknown_parameter"}}, status_code=400)


def anthropic_path(path: str) -> bool:
    return path.endswith(ANTHROPIC_PATHS)


def anthropic_body(status: int, message: str) -> dict:
    """Anthropic's error object: {"type": "error", "error": {"type", "message"}}."""
    kind = ANTHROPIC_TYPES.get(status, "invalid_request_error" if status < 500 else "api_error")
    return {"type": "error", "error": {"type": kind, "message": message}}


def error_response(exc: ModelyardError, detail: bool = False, path: str = "") -> JSONResponse:
    """The error's body; its detail (why an endpoint is not ready) only if `detail`."""
    headers = {"Retry-After": str(max(1, round(exc.retry_after)))} if exc.retry_after is not None else None
    body = exc.body(detail)
    if anthropic_path(path):
        body = anthropic_body(exc.status, body["error"]["message"])
    return JSONResponse(body, status_code=exc.status, headers=headers)


def limit_error(field: str, value: object, limit: int, what: str) -> RequestValidationError:
    """A settings limit broken by a body field, reported like any other 422 on that field."""
    return RequestValidationError([{
        "loc": ("body", field), "type": "less_than_equal", "input": value, "ctx": {"le": limit},
        "msg": f"{what} is {value}, above this server's limit of {limit}"}])


def install(app: FastAPI) -> None:
    @app.exception_handler(ModelyardError)
    async def _ours(request: Request, exc: ModelyardError) -> JSONResponse:
        return error_response(exc, may_see_reasons(request), request.url.path)

    @app.exception_handler(HTTPException)
    async def _http(request: Request, exc: HTTPException) -> JSONResponse:
        # Starlette's and FastAPI's own errors (unknown route 404, wrong method 405, a body that
        # is not UTF-8 400) in OpenAI's shape rather than {"detail": "<string>"}.
        kind = "not_found_error" if exc.status_code == 404 else (
            "server_error" if exc.status_code >= 500 else "invalid_request_error")
        body = {"error": {"message": str(exc.detail), "type": kind, "param": None, "code": None}}
        if anthropic_path(request.url.path):
            body = anthropic_body(exc.status_code, str(exc.detail))
        return JSONResponse(body, status_code=exc.status_code, headers=getattr(exc, "headers", None))

    @app.exception_handler(Exception)
    async def _bug(request: Request, exc: Exception) -> JSONResponse:
        log.exception("unhandled error on %s", request.url.path)
        return JSONResponse({"error": {"message": f"internal error: {type(exc).__name__}",
                                       "type": "server_error", "param": None, "code": None}},
                            status_code=500)

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, exc: RequestValidationError) -> JSONResponse:
        # FastAPI's own 422 body, {"detail": [{"loc", "msg", "type", "input", ...}]}, bounded:
        # FastAPI echoes each bad value whole, so a 1 MB field came back as a 1 MB answer (and a
        # list of 100k bad items as 100k entries).
        errors = exc.errors()
        if anthropic_path(request.url.path):
            # Anthropic's API answers a bad body 400 in its shape, naming the field
            first = bounded_error(errors[0]) if errors else {"loc": ["body"], "msg": "invalid body"}
            where = ".".join(str(p) for p in first.get("loc", ())[1:]) or "body"
            more = f" (and {len(errors) - 1} more)" if len(errors) > 1 else ""
            return JSONResponse(anthropic_body(400, f"{where}: {first.get('msg')}{more}"), status_code=400)
        if responses_path(request.url.path) and (refused := unknown_parameters(errors)) is not None:
            return refused
        detail = [bounded_error(e) for e in errors[:MAX_ERRORS]]
        if len(errors) > MAX_ERRORS:
            detail.append({"loc": ["body"], "type": "too_many_errors", "input": None,
                           "msg": f"{len(errors) - MAX_ERRORS} more errors not shown (at most {MAX_ERRORS} are)"})
        return JSONResponse({"detail": jsonable_encoder(detail)}, status_code=422)


MAX_ERRORS = 20          # validation errors listed in one 422
MAX_ECHO = 100           # characters of a bad value echoed in one


def bounded_error(error: dict) -> dict:
    """One validation error with its echoed `input` cut to MAX_ECHO characters (or, for a list
    or object, its size), and the actual length in a too-long message (pydantic names only the
    limit): the field, the limit and the value."""
    out = {k: v for k, v in error.items() if k != "url"}
    value = out.get("input")
    if isinstance(value, (str, bytes)) and len(value) > MAX_ECHO:
        out["input"] = f"{value[:MAX_ECHO]!s}... ({len(value)} characters)"
    elif isinstance(value, (list, tuple, dict)) and len(repr(value)) > MAX_ECHO:
        out["input"] = f"<{type(value).__name__} of {len(value)} items>"
    if out.get("type") == "string_too_long" and isinstance(value, str):
        out["msg"] = f"{out['msg']}, got {len(value)}"
    return out
