"""Opt-in conversion with llama.cpp's quantizer: cached, atomic, and really Q8_0."""

from __future__ import annotations

from pathlib import Path

import pytest

from modelyard.errors import ConfigError
from modelyard.local.convert import converted
from modelyard.local.ffi import LlamaModel
from modelyard.store import ModelStore

pytestmark = pytest.mark.model


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
    assert [p.name for p in tmp_path.iterdir()] == [out.name]   # no temp file left behind


def test_unknown_format_is_a_config_error(tmp_path):
    with pytest.raises(ConfigError, match="q8_0"):
        converted(tmp_path / "x.gguf", "q3_k", tmp_path, threads=1)
