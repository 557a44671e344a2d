"""Opt-in conversion with llama.cpp's quantizer: cached, atomic, and really Q8_0."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from modelyard.errors import ConfigError
from modelyard.local import convert as convert_mod
from modelyard.local.convert import converted
from modelyard.local.ffi import LlamaModel
from modelyard.store import ModelStore



@pytest.mark.model
def test_convert_to_q8_0_is_cached(tmp_path):
    src = ModelStore(Path.home() / ".cache" / "modelyard", progress=False).resolve("smollm2-135m")
    out = converted(src, "q8_0", tmp_path, threads=2)
    model = LlamaModel(out)
    try:
        assert model.meta("general.file_type") == "7"          # LLAMA_FTYPE_MOSTLY_Q8_0
        assert model.tokenize("Hello") == LlamaModel(src).tokenize("Hello")
    finally:
        model.close()
    stamp = out.stat().st_mtime_ns
    assert converted(src, "q8_0", tmp_path, threads=2) == out and out.stat().st_mtime_ns == stamp
    names = sorted(p.name for p in tmp_path.iterdir())
    assert names[-1] == out.name and len(names) == 2, names       # no temp file left behind...
    assert names[0].startswith(".source-") and names[0].endswith(".json")   # ...beside the digest sidecar


def test_unknown_format_is_a_config_error(tmp_path):
    with pytest.raises(ConfigError, match="q8_0"):
        converted(tmp_path / "x.gguf", "q3_k", tmp_path, threads=1)


# -- the cache's key (pure logic: llama.cpp's quantizer replaced by a copy that says what it did) --

@pytest.fixture
def fake_quantize(monkeypatch):
    calls: list[Path] = []

    def quantize(src: Path, dst: Path, kind: str, threads: int) -> None:
        calls.append(src)
        dst.write_bytes(kind.encode() + b":" + src.read_bytes())
    monkeypatch.setattr(convert_mod.ffi, "quantize", quantize)
    return calls


@pytest.fixture
def hashes(monkeypatch):
    seen: list[Path] = []
    real = convert_mod.file_sha256
    monkeypatch.setattr(convert_mod, "file_sha256", lambda p: seen.append(p) or real(p))
    return seen


def test_sources_with_one_name_get_their_own_conversions(tmp_path, fake_quantize):
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    a, b = tmp_path / "a" / "model.gguf", tmp_path / "b" / "model.gguf"
    a.write_bytes(b"weights A")
    b.write_bytes(b"weights B")
    cache = tmp_path / "cache"
    out_a, out_b = converted(a, "q8_0", cache, 1), converted(b, "q8_0", cache, 1)
    assert out_a != out_b
    assert out_a.read_bytes() == b"q8_0:weights A" and out_b.read_bytes() == b"q8_0:weights B"
    assert converted(a, "q8_0", cache, 1) == out_a and len(fake_quantize) == 2    # cached


def test_a_changed_source_is_converted_again(tmp_path, fake_quantize, hashes):
    src, cache = tmp_path / "model.gguf", tmp_path / "cache"
    src.write_bytes(b"old weights")
    first = converted(src, "q4_0", cache, 1)
    assert converted(src, "q4_0", cache, 1) == first
    assert len(hashes) == 1                     # unchanged path, size and mtime: not hashed again
    src.write_bytes(b"new weights!")
    os.utime(src, ns=(src.stat().st_atime_ns, src.stat().st_mtime_ns + 10**9))
    second = converted(src, "q4_0", cache, 1)
    assert second != first and second.read_bytes() == b"q4_0:new weights!"
    assert len(hashes) == 2 and len(fake_quantize) == 2
