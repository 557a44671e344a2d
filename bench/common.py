"""Small helpers every benchmark script shares (run as `python bench/X.py`, so `bench/` is on
sys.path and `from common import ...` works)."""

from __future__ import annotations

import socket
import statistics


def free_port() -> int:
    """A free port on loopback (benchmarks never listen beyond it)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def median_spread(xs: list[float | None]) -> tuple[float | None, float | None, float | None]:
    """(median, min, max) of the measured values; None where nothing was measured."""
    xs = [x for x in xs if x is not None]
    if not xs:
        return None, None, None
    return statistics.median(xs), min(xs), max(xs)


def ratio(a: float | None, b: float | None) -> float | None:
    return a / b if a is not None and b else None
