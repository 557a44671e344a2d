"""Run in-process llama.cpp work on a thread of its own, with ggml's fixed-order kernels pinned to
it or not (local/ffi.use_fixed_order_kernels is per thread, as an engine thread uses it)."""

from __future__ import annotations

import threading
from typing import Callable, TypeVar

T = TypeVar("T")


def on_a_thread(fn: Callable[[], T], fixed: bool, timeout: float = 600) -> T:
    """fn()'s result, computed on a fresh thread whose fixed-order kernels are `fixed`; its
    exception is raised here."""
    from modelyard.local.ffi import use_fixed_order_kernels
    out: list[T] = []
    errors: list[BaseException] = []

    def run() -> None:
        try:
            assert use_fixed_order_kernels(fixed), "scripts/install builds llama.cpp with scripts/patches applied"
            out.append(fn())
        except BaseException as exc:  # noqa: BLE001 - re-raised on the caller's thread
            errors.append(exc)
    t = threading.Thread(target=run)
    t.start()
    t.join(timeout)
    assert not t.is_alive() and not errors, errors
    return out[0]
