"""CredentialGate: a route's credential check runs before any of its body is read.

FastAPI reads and parses a route's body before it runs the route's dependencies, so a check
written only as a dependency (api/auth.require_key, api/admin/auth.viewer and admin) let a caller
with no credential make the server read a whole body first: an unauthenticated PATCH of 300 MB
once grew the server by 600 MB before its 401.

Auth stays in one place: each check is written once (auth.py, control.py) and a route declares
what it needs once, with `Depends(check)` (its own, or its router's at include time).
`before_body` marks such a check as one that reads the request's headers and scope only.
`GatedRoutes` reads those declarations off the routers as create_app includes them, and this
middleware runs the checks of the route a request is for before the app, and so the body, is
touched. A refusal (401, 403, 429) is answered here and the body is never read
(api/middleware/body_limits.BodyLimits, outside, ends such a connection with the answer). Each result is
kept in the request's scope and FastAPI's own call of the dependency returns it: every check
runs once per request (a key's quota counts the request once).

Why not a table of path prefixes: it would be a second statement of what each route needs, and
would drift from the routes' own `Depends`. Why not FastAPI's own route matching: its included
routers are resolved lazily by private machinery that changes between versions; the routers'
own `routes` and `compile_path` are stable.
"""

from __future__ import annotations

import inspect
import re
from typing import Any, Awaitable, Callable, Sequence

from fastapi import APIRouter, Request, params
from fastapi.routing import APIRoute
from starlette.routing import compile_path, get_route_path
from starlette.types import ASGIApp, Receive, Scope, Send

from ...errors import ModelyardError

_RESULTS = "modelyard.checked"      # scope["state"] key: {check: its result} for this request

Check = Callable[[Request], Any]
Gated = Callable[[Request], Awaitable[Any]]


def before_body(check: Check) -> Gated:
    """`check(request)` (sync or async, headers and scope only, never the body) as a FastAPI
    dependency that CredentialGate also runs before the body is read, whichever runs it first."""
    async def dependency(request: Request) -> Any:
        results = request.scope.setdefault("state", {}).setdefault(_RESULTS, {})
        if dependency not in results:
            result = check(request)
            results[dependency] = await result if inspect.isawaitable(result) else result
        return results[dependency]

    dependency.__name__, dependency.__qualname__ = check.__name__, check.__qualname__
    dependency.__doc__ = check.__doc__
    dependency.runs_before_body = True      # type: ignore[attr-defined]
    return dependency


class GatedRoutes:
    """Route templates (as served: prefix + path) and methods -> the `before_body` checks they need."""

    def __init__(self) -> None:
        self._routes: list[tuple[re.Pattern[str], set[str], tuple[Gated, ...]]] = []

    def add(self, router: APIRouter, prefix: str = "", dependencies: Sequence[params.Depends] = ()) -> None:
        """`router`'s routes as included under `prefix` with these router-level dependencies."""
        shared = [d.dependency for d in dependencies if getattr(d.dependency, "runs_before_body", False)]
        for route in router.routes:
            if isinstance(route, APIRoute):
                checks = tuple(dict.fromkeys([*shared, *_marked(route.dependant)]))
                if checks:
                    regex, _, _ = compile_path(prefix + route.path)
                    self._routes.append((regex, set(route.methods), checks))

    def checks(self, scope: Scope) -> tuple[Gated, ...]:
        path = get_route_path(scope)
        for regex, methods, checks in self._routes:
            if scope["method"] in methods and regex.match(path):
                return checks
        return ()       # an open route, or none: the router answers 404/405 without reading the body


class CredentialGate:
    def __init__(self, app: ASGIApp, routes: GatedRoutes) -> None:
        self.app = app
        self.routes = routes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http":
            checks = self.routes.checks(scope)
            if checks:
                request = Request(scope)
                try:
                    for check in checks:
                        await check(request)
                except ModelyardError as exc:
                    # Imported here: api/errors imports api/auth, which imports this module.
                    from ..errors import error_response
                    return await error_response(exc, path=scope.get("path", ""))(scope, receive, send)
        await self.app(scope, receive, send)


def _marked(dependant) -> list[Gated]:
    """The `before_body` checks among a route's own dependencies (and theirs)."""
    found = []
    for sub in dependant.dependencies:
        if getattr(sub.call, "runs_before_body", False):
            found.append(sub.call)
        found += _marked(sub)
    return found
