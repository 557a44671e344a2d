"""The upstream /embeddings body, and the checks on its answer before any client sees it."""

from __future__ import annotations

import base64
import binascii
import json
import math
import struct
from typing import Any

import httpx

from ..engine.types import EmbeddingRequest, EmbeddingResult
from ..errors import UpstreamError
from ..settings import EndpointSpec


def embedding_body(spec: EndpointSpec, req: EmbeddingRequest) -> dict[str, Any]:
    """base64 is asked for because it is the official client's default, so every server that
    works with it (vLLM, TEI, Infinity, llama-server, Ollama, modelyard) speaks it, and it is a
    fraction of the JSON; answers in floats are read as well. Optional fields only when set."""
    body: dict[str, Any] = {"model": spec.upstream_model or spec.name,
                            "input": [x if isinstance(x, str) else list(x) for x in req.inputs],
                            "encoding_format": "base64"}
    if req.dimensions is not None:
        body["dimensions"] = req.dimensions
    if req.truncate:
        body["truncate"] = True       # TEI's name; servers without it either ignore it or say 4xx
    return body


def read_embeddings(url: str, resp: httpx.Response, req: EmbeddingRequest) -> EmbeddingResult:
    """One finite vector per input, in input order, all of one size (`dimensions` if asked);
    else UpstreamError (502) saying what was wrong."""
    try:
        return _read(resp.json(), req)
    except (ValueError, TypeError, KeyError, AttributeError, binascii.Error, struct.error) as exc:
        raise UpstreamError(f"upstream {url} sent a malformed embeddings answer ({exc}): "
                            f"{resp.text[:200]}") from None


def _read(body: Any, req: EmbeddingRequest) -> EmbeddingResult:
    data = body["data"]
    if not isinstance(data, list) or len(data) != len(req.inputs):
        raise ValueError(f"{len(data) if isinstance(data, list) else 'no'} vectors for {len(req.inputs)} inputs")
    vectors: dict[int, tuple[float, ...]] = {}
    for position, item in enumerate(data):
        index = item.get("index", position)
        if not isinstance(index, int) or index in vectors or not 0 <= index < len(data):
            raise ValueError(f"index {json.dumps(index)[:20]} at position {position}")
        vectors[index] = _vector(item["embedding"])
    sizes = {len(v) for v in vectors.values()}
    if len(sizes) != 1 or 0 in sizes:
        raise ValueError(f"vectors of sizes {sorted(sizes)}")
    if req.dimensions is not None and sizes != {req.dimensions}:
        raise ValueError(f"{sizes.pop()} dimensions where {req.dimensions} were asked for")
    usage = body.get("usage") or {}
    return EmbeddingResult(tuple(vectors[i] for i in range(len(data))), int(usage.get("prompt_tokens") or 0))


def _vector(raw: Any) -> tuple[float, ...]:
    if isinstance(raw, str):       # base64 of little-endian float32, as OpenAI sends it
        packed = base64.b64decode(raw, validate=True)
        values = struct.unpack(f"<{len(packed) // 4}f", packed)
    elif isinstance(raw, list) and all(isinstance(x, (int, float)) and not isinstance(x, bool) for x in raw):
        values = tuple(float(x) for x in raw)
    else:
        raise TypeError("an embedding must be a list of numbers or a base64 string")
    if not all(math.isfinite(x) for x in values):
        raise ValueError("a vector holds NaN or infinity")
    return values
