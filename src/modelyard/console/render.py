"""The console's HTML: one Jinja environment (autoescaped), its filters, the page list and `render`.

Every page and fragment is rendered here from server state at each request, with what the base
template needs (the session, its CSRF token for htmx's headers, the navigation).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from fastapi import Request
from fastapi.responses import HTMLResponse
from jinja2 import Environment, FileSystemLoader

from . import views
from .session import Session

env = Environment(loader=FileSystemLoader(Path(__file__).parent / "templates"), autoescape=True,
                  trim_blocks=True, lstrip_blocks=True)
env.filters["utc"] = views.utc
env.filters["tojson_attr"] = lambda v: json.dumps(v)      # autoescaped where used in an attribute

PAGES = (("endpoints", "Endpoints"), ("live", "Live"), ("playground", "Playground"), ("keys", "Keys"),
         ("usage", "Usage"), ("models", "Models"), ("batches", "Batches"))


def render(request: Request, template: str, session: Session | None, status: int = 200,
           flash: tuple[str, str] | None = None, **context: Any) -> HTMLResponse:
    """A template as the answer; `flash` (kind, message) goes to the page's #flash region."""
    sessions = request.app.state.console.sessions
    html = env.get_template(template).render(
        session=session, csrf=sessions.csrf(session) if session else "", pages=PAGES,
        flash=flash, **context)
    return HTMLResponse(html, status_code=status)
