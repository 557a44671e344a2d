"""Server-side SVG line charts for the Live page: a series -> the numbers a template draws.

No script draws anything: the SVG is plain markup (the CSP allows no inline script), labelled
with its title, its scale and its latest value as text, so it reads without colour.
"""

from __future__ import annotations

WIDTH, HEIGHT, PAD = 300, 80, 2


def nice_max(value: float) -> float:
    """The axis top: 1, 2 or 5 times a power of ten at or above `value` (never 0)."""
    if value <= 0:
        return 1.0
    scale = 10 ** len(str(int(value))) / 10 if value >= 1 else 1.0
    while scale > value:
        scale /= 10
    for step in (1, 2, 5, 10):
        if step * scale >= value:
            return step * scale
    return 10 * scale


def fmt(value: float | None, unit: str) -> str:
    if value is None:
        return "–"
    if unit == "s":
        return f"{value * 1000:.0f} ms" if value < 1 else f"{value:.2f} s"
    return f"{value:.1f}{(' ' + unit) if unit else ''}" if value < 100 else f"{value:.0f}{(' ' + unit) if unit else ''}"


def chart(points: list[tuple[float, float | None]], title: str, unit: str, span: float) -> dict:
    """`points` (unix time, value or None for no data) over the last `span` seconds."""
    values = [v for _, v in points if v is not None]
    top = nice_max(max(values) if values else 0.0)
    end = points[-1][0] if points else 0.0
    segments, current = [], []
    for t, v in points:
        if v is None:                    # a gap, not a drop to zero (no TTFT without requests)
            if current:
                segments.append(current)
            current = []
            continue
        x = PAD + (WIDTH - 2 * PAD) * max(0.0, 1 - (end - t) / span)
        y = HEIGHT - PAD - (HEIGHT - 2 * PAD) * min(v / top, 1.0)
        current.append(f"{x:.1f},{y:.1f}")
    if current:
        segments.append(current)
    latest = next((v for _, v in reversed(points) if v is not None), None)
    return {"title": title, "width": WIDTH, "height": HEIGHT, "lines": [" ".join(s) for s in segments],
            "top": fmt(top, unit), "latest": fmt(latest, unit), "span": int(span),
            "label": f"{title}: latest {fmt(latest, unit)}, scale 0 to {fmt(top, unit)}, last {int(span)} s"}
