"""The one way a test (or a harness) waits for something that happens in another thread or
process: poll a check until it holds, or fail saying what did not happen within how long.

One helper instead of a loop per file, so that every wait has a bound, says what it waited for,
and reports the last value it saw; the bounds are generous (a loaded 2-core CI machine), since a
wait that holds returns as soon as its check does and only a failure pays the whole timeout.
"""

from __future__ import annotations

import time
from typing import Callable, TypeVar

T = TypeVar("T")


def until(check: Callable[[], T], timeout: float, what: str = "the condition", *,
          interval: float = 0.1, retry_on: tuple[type[BaseException], ...] = ()) -> T:
    """`check()`'s first truthy value, polled every `interval` seconds; an AssertionError naming
    `what` (and the last value, or the last of `retry_on`'s exceptions, which count as "not
    yet") if `timeout` seconds pass first. `check` runs at least once, and once more at the
    deadline, so a slow poll never fails a condition that holds by then."""
    deadline = time.monotonic() + timeout
    while True:
        expired = time.monotonic() >= deadline
        try:
            value = check()
        except retry_on as exc:
            value, last = None, repr(exc)          # type: ignore[assignment]
        else:
            last = repr(value)
        if value:
            return value
        if expired:
            raise AssertionError(f"{what}: not within {timeout:g}s (last: {last[:500]})")
        time.sleep(max(0.0, min(interval, deadline - time.monotonic())))
