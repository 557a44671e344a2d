"""Opt-in conversion of a model to a format with fast CPU kernels (`convert = "q8_0"`).

The default model's Q4_1 has no repacked kernels on x86; Q8_0 and Q4_0 do, and run faster,
but their greedy output differs from the published file's: never on by default, and
bench/quality.py measures what it costs. Converted files are cached beside the original.
"""

from __future__ import annotations

import os
import uuid
from pathlib import Path

from ..errors import ConfigError
from . import ffi


def converted(path: Path, kind: str, cache: Path, threads: int) -> Path:
    if kind not in ffi.QUANTS:
        raise ConfigError(f"convert must be one of {sorted(ffi.QUANTS)}, got {kind!r}")
    out = cache / f"{path.stem}.{kind}.gguf"
    if out.exists():
        return out
    cache.mkdir(parents=True, exist_ok=True)
    # Unique per call: two endpoints of one server may convert the same file at once.
    tmp = out.with_name(f".{out.name}.{uuid.uuid4().hex}.tmp")
    try:
        ffi.quantize(path, tmp, kind, threads)
        os.replace(tmp, out)         # never a half-written file under the final name
    finally:
        tmp.unlink(missing_ok=True)
    return out
