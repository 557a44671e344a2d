"""Opt-in conversion of a model to a format with fast CPU kernels (`convert = "q8_0"`).

The default model's Q4_1 has no repacked kernels on x86; Q8_0 and Q4_0 do, and run faster,
but their greedy output differs from the published file's: never on by default, and
bench/quality.py measures what it costs.

Converted files are cached by the CONTENT of their source: `<stem>.<sha256>.<kind>.gguf`. Two
sources that share a name (/a/model.gguf, /b/model.gguf) get their own conversions, and a
source that changes gets a new one. Hashing a model costs a read of it, so its digest is kept in
a sidecar keyed by the source's path, size and mtime, and computed again only when those change.
"""

from __future__ import annotations

import hashlib
import json
import os
import uuid
from pathlib import Path

from ..errors import ConfigError
from ..store import file_sha256
from . import ffi


def converted(path: Path, kind: str, cache: Path, threads: int) -> Path:
    if kind not in ffi.QUANTS:
        raise ConfigError(f"convert must be one of {sorted(ffi.QUANTS)}, got {kind!r}")
    cache.mkdir(parents=True, exist_ok=True)
    out = cache / f"{path.stem}.{source_digest(path, cache)}.{kind}.gguf"
    if out.exists():
        return out
    # Unique per call: two endpoints of one server may convert the same file at once.
    tmp = out.with_name(f".{out.name}.{uuid.uuid4().hex}.tmp")
    try:
        ffi.quantize(path, tmp, kind, threads)
        os.replace(tmp, out)         # never a half-written file under the final name
    finally:
        tmp.unlink(missing_ok=True)
    return out


def source_digest(path: Path, cache: Path) -> str:
    """The sha256 of `path`'s bytes, from the sidecar in `cache` while the file's path, size and
    mtime are those it recorded; else hashed now and recorded."""
    path = path.resolve()
    st = path.stat()
    stamp = {"path": str(path), "size": st.st_size, "mtime_ns": st.st_mtime_ns}
    sidecar = cache / f".source-{hashlib.sha256(str(path).encode()).hexdigest()[:32]}.json"
    try:
        seen = json.loads(sidecar.read_text())
        if {k: seen.get(k) for k in stamp} == stamp and isinstance(seen.get("sha256"), str):
            return seen["sha256"]
    except (OSError, ValueError):
        pass
    digest = file_sha256(path)
    tmp = sidecar.with_name(f"{sidecar.name}.{uuid.uuid4().hex}.tmp")   # unique: endpoints load at once
    tmp.write_text(json.dumps({**stamp, "sha256": digest}))
    os.replace(tmp, sidecar)
    return digest
