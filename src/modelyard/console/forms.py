"""The console's form fields: htmx's json-enc sends every field as a string, so a number or a list
is parsed here, and a bad value answers with the field's name and what it takes (`FieldError`),
before anything is asked of the admin API (which validates again, with its own words).
"""

from __future__ import annotations

from fastapi import Request


class FieldError(ValueError):
    pass


async def json_body(request: Request) -> dict:
    """The request's JSON object; {} for anything else (each field's check then says what is missing)."""
    try:
        data = await request.json()
    except ValueError:
        return {}
    return data if isinstance(data, dict) else {}


def text(body: dict, name: str, required: bool = False) -> str | None:
    """A field's text, stripped; None when empty (FieldError if required)."""
    value = body.get(name)
    value = value.strip() if isinstance(value, str) else None
    if not value:
        if required:
            raise FieldError(f"{name} is required")
        return None
    return value


def whole(body: dict, name: str, lo: int, hi: int) -> int | None:
    """A field's whole number from lo to hi; None when empty."""
    raw = text(body, name)
    if raw is None:
        return None
    try:
        value = int(raw)
    except ValueError:
        raise FieldError(f"{name} must be a whole number from {lo} to {hi}, got {raw!r}") from None
    if not lo <= value <= hi:
        raise FieldError(f"{name} must be from {lo} to {hi}, got {value}")
    return value


def listed(body: dict, name: str) -> list[str] | None:
    """A field's items, comma- or line-separated; None when empty."""
    raw = text(body, name)
    return [p.strip() for p in raw.replace("\n", ",").split(",") if p.strip()] if raw else None
