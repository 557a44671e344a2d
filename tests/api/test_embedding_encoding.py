"""The two wire forms of a vector (api/openai/embeddings): JSON numbers and OpenAI's base64 carry the
same float32 values bit for bit, whatever the value; a non-finite one is never sent."""

from __future__ import annotations

import base64
import json
import struct

import numpy as np
import pytest

from modelyard.api.openai.embeddings import as_base64, as_floats, response_body
from modelyard.engine.types import EmbeddingResult
from modelyard.errors import EngineError

F32 = np.finfo(np.float32)
EDGES = [0.0, -0.0, 1.0, -1.0, float(F32.max), float(-F32.max), float(F32.tiny), float(F32.smallest_subnormal),
         float(np.float32(0.1)), float(np.float32(1 / 3)), float(np.nextafter(np.float32(1), np.float32(2)))]


def test_json_numbers_carry_every_float32_exactly():
    rng = np.random.default_rng(0)
    spread = rng.standard_normal(4000) * 10.0 ** rng.integers(-45, 39, 4000)     # subnormals to near max
    with np.errstate(over="ignore"):
        values = np.concatenate([np.array(EDGES), spread]).astype(np.float32)
    values = values[np.isfinite(values)]
    assert len(values) > 3000
    parsed = np.array(json.loads(as_floats(tuple(values.tolist()))), dtype=np.float64).astype(np.float32)
    assert parsed.tobytes() == values.tobytes()        # bit for bit, signs of zero included


def test_base64_is_little_endian_float32_as_the_official_client_decodes_it():
    vector = tuple(np.array(EDGES, dtype=np.float32).tolist())
    decoded = np.frombuffer(base64.b64decode(json.loads(as_base64(vector))), dtype="<f4")
    assert decoded.tobytes() == struct.pack(f"<{len(vector)}f", *vector)


def test_the_body_is_openais_shape_in_either_form():
    result = EmbeddingResult(((0.5, -2.0), (1.25, 0.0)), 9)
    for encoding, first in (("float", [0.5, -2.0]), ("base64", base64.b64encode(struct.pack("<2f", 0.5, -2.0)).decode())):
        body = json.loads(response_body('odd "name" é', result, encoding))
        assert body == {"object": "list", "model": 'odd "name" é',
                        "data": [{"object": "embedding", "index": 0, "embedding": first},
                                 {"object": "embedding", "index": 1, "embedding": body["data"][1]["embedding"]}],
                        "usage": {"prompt_tokens": 9, "total_tokens": 9}}


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")])
def test_a_non_finite_value_is_an_engine_error_not_a_broken_body(bad):
    with pytest.raises(EngineError, match="not finite"):
        as_floats((0.5, bad))
