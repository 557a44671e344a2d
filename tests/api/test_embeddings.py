"""/embeddings over real HTTP against a real `modelyard serve` with minilm-l6-v2 embedded (and
smollm2-135m beside it, for the kinds), and through a second real `modelyard serve` whose
`engine = "openai"` endpoint has the first as its upstream: the official client's base64 round
trip, OpenAI's shapes, the limits, the kinds, quotas, and the remote path giving the same bits.
(The conversion against a numpy reference and batch invariance are tests/local/test_embed*.py.)
"""

from __future__ import annotations

import base64
import json
import math
import os
import re
import struct
import subprocess
import sys
from pathlib import Path
from typing import Iterator

import httpx
import pytest

from testkit.openai_document import conforms
from testkit.servers import ServerProcess, served

pytestmark = pytest.mark.model

KEY, QUOTA_KEY = "embed-key", "embed-quota-key"
MINILM, SMOL = "minilm-l6-v2", "smollm2-135m"
CONTEXT = 512                 # minilm's own
QUOTA = 40                    # tpm of QUOTA_KEY
TEXTS = ["The cat sits on the mat.", "A cat is resting on a rug.", "Stock markets fell sharply today."]
README = (Path(__file__).parent.parent.parent / "README.md").read_text()

CONFIG = f"""\
[server]
api_keys = ["{KEY}"]
log_level = "info"

[[keys]]
key = "{QUOTA_KEY}"
tpm = {QUOTA}

[[endpoints]]
name = "{MINILM}"
model = "{MINILM}"
context = {CONTEXT}
threads = 1

[[endpoints]]
name = "minilm-file"
model = "{{path}}"
context = {CONTEXT}
threads = 1

[[endpoints]]
name = "{SMOL}"
model = "{SMOL}"
context = 256
parallel = 1
threads = 1
"""


def gateway_config(upstream_api: str) -> str:
    return f"""\
[server]
api_keys = ["{KEY}"]
log_level = "info"

[[endpoints]]
name = "remote-minilm"
engine = "openai"
kind = "embeddings"
urls = ["{upstream_api}"]
upstream_model = "{MINILM}"
api_key = "{KEY}"
"""


def minilm_file() -> Path:
    """The store's minilm GGUF as a plain file path: its kind then comes from its header."""
    from modelyard.settings import load
    from modelyard.store import ModelStore
    return ModelStore(load(env=os.environ).store_dir, progress=False).resolve(MINILM)


@pytest.fixture(scope="module")
def srv(tmp_path_factory) -> Iterator[ServerProcess]:
    with served(tmp_path_factory.mktemp("embed"), CONFIG.replace("{path}", str(minilm_file())), key=KEY) as s:
        s.model = MINILM
        yield s


@pytest.fixture(scope="module")
def gateway(srv, tmp_path_factory) -> Iterator[ServerProcess]:
    with served(tmp_path_factory.mktemp("embed-gw"), gateway_config(srv.api), name="gateway", key=KEY) as g:
        g.model = "remote-minilm"
        yield g


@pytest.fixture(scope="module")
def client(srv) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=srv.api, headers=srv.headers, timeout=120) as c:
        yield c


def embed(client: httpx.Client, input, model: str = MINILM, **extra) -> httpx.Response:
    return client.post("/embeddings", json={"model": model, "input": input, **extra})


def vectors(r: httpx.Response) -> list[list[float]]:
    assert r.status_code == 200, r.text
    return [d["embedding"] for d in r.json()["data"]]


def float32(vector: list[float]) -> bytes:
    return struct.pack(f"<{len(vector)}f", *vector)


def dot(a, b) -> float:
    return sum(x * y for x, y in zip(a, b))


def test_openai_client_default_base64_equals_the_float_answer(srv, client):
    openai = pytest.importorskip("openai")
    oc = openai.OpenAI(base_url=srv.api, api_key=KEY, max_retries=0)
    out = oc.embeddings.create(model=MINILM, input=TEXTS)            # base64 on the wire, decoded by the client
    floats = embed(client, TEXTS)
    # the same float32 bits either way: JSON carries each in 9 digits, base64 as its 4 bytes
    assert [float32(d.embedding) for d in out.data] == [float32(v) for v in vectors(floats)]
    assert out.usage.prompt_tokens == floats.json()["usage"]["prompt_tokens"] > 0
    raw = embed(client, TEXTS[0], encoding_format="base64").json()["data"][0]["embedding"]
    assert base64.b64decode(raw) == struct.pack("<384f", *vectors(floats)[0])


def test_openais_shape_unit_vectors_and_meaning(client):
    r = embed(client, TEXTS)
    body = r.json()
    assert body["object"] == "list" and body["model"] == MINILM
    assert [(d["object"], d["index"]) for d in body["data"]] == [("embedding", i) for i in range(3)]
    assert body["usage"]["total_tokens"] == body["usage"]["prompt_tokens"]
    vs = vectors(r)
    assert all(len(v) == 384 and math.isclose(math.sqrt(dot(v, v)), 1.0, rel_tol=1e-5) for v in vs)
    assert dot(vs[0], vs[1]) > dot(vs[0], vs[2]) + 0.2                # close sentences rank above unrelated
    # prompt tokens add up over the inputs
    each = [embed(client, t).json()["usage"]["prompt_tokens"] for t in TEXTS]
    assert sum(each) == body["usage"]["prompt_tokens"]


def test_an_input_alone_equals_it_among_others(client):
    alone = vectors(embed(client, TEXTS[2]))[0]
    mixed = vectors(embed(client, ["short", TEXTS[0] * 6, TEXTS[2], "x " * 50]))
    assert mixed[2] == alone


def test_an_input_past_the_context_is_a_400_naming_it_unless_truncated(client):
    long = "word " * (CONTEXT + 100)
    r = embed(client, ["fine", long])
    assert r.status_code == 400, r.text
    message = r.json()["error"]["message"]
    assert "1" in message and str(CONTEXT) in message, message
    assert re.search(r"\b\d{3,}\b", message.replace(str(CONTEXT), "")), message     # its length
    truncated = embed(client, ["fine", long], truncate=True)
    assert truncated.status_code == 200, truncated.text
    assert truncated.json()["usage"]["prompt_tokens"] <= CONTEXT + embed(client, "fine").json()["usage"]["prompt_tokens"]


def test_token_ids_outside_the_vocabulary_and_dimensions_are_400s(client):
    r = embed(client, [[101, 7592, 30522, 102]])                     # minilm has 30,522 tokens: 0..30521
    assert r.status_code == 400 and "30522" in r.json()["error"]["message"], r.text
    assert vectors(embed(client, [[101, 7592, 102]]))                # in range: fine
    r = embed(client, "hello", dimensions=128)
    assert r.status_code == 400 and "dimensions" in r.json()["error"]["message"], r.text


def test_kinds_on_embedded_endpoints(srv, client):
    r = client.post("/completions", json={"model": MINILM, "prompt": "hi", "max_tokens": 1})
    assert r.status_code == 400 and "is an embeddings endpoint" in r.json()["error"]["message"], r.text
    r = client.post("/chat/completions", json={"model": MINILM, "messages": [{"role": "user", "content": "hi"}]})
    assert r.status_code == 400 and "is an embeddings endpoint" in r.json()["error"]["message"], r.text
    r = embed(client, "hi", model=SMOL)
    assert r.status_code == 400 and "is a completions endpoint" in r.json()["error"]["message"], r.text
    by_id = {m["id"]: m for m in client.get("/models").json()["data"]}
    assert (by_id[MINILM]["model_type"], by_id[MINILM]["model_engine"]) == ("EMBEDDINGS", "LLAMA_CPP")
    assert by_id["minilm-file"]["model_type"] == "EMBEDDINGS"           # read from the GGUF's header
    assert vectors(embed(client, TEXTS, model="minilm-file")) == vectors(embed(client, TEXTS))
    assert (by_id[SMOL]["model_type"], by_id[SMOL]["model_engine"]) == ("COMPLETIONS", "LLAMA_CPP")
    ep = srv.wait_idle(fields=("in_flight", "queue_depth"))
    assert (ep["model_type"], ep["model_engine"], ep["in_flight"], ep["queue_depth"]) == ("EMBEDDINGS", "LLAMA_CPP", 0, 0)


def test_tokenizer_routes_are_for_the_completions_endpoint(srv):
    """Without `model`, /tokenize takes the one embedded completions endpoint (the embedders
    beside it do not count); naming an embeddings endpoint is the wrong kind's 400."""
    r = httpx.post(f"{srv.base}/tokenize", json={"prompt": "Hello"}, headers=srv.headers, timeout=30)
    assert r.status_code == 200 and r.json()["count"] >= 1, r.text
    r = httpx.post(f"{srv.base}/tokenize", json={"model": MINILM, "prompt": "Hello"}, headers=srv.headers, timeout=30)
    assert r.status_code == 400 and "is an embeddings endpoint" in r.json()["error"]["message"], r.text


def test_prompt_tokens_are_reserved_against_the_tpm_quota(srv):
    with httpx.Client(base_url=srv.api, headers={"Authorization": f"Bearer {QUOTA_KEY}"}, timeout=60) as c:
        too_big = embed(c, "word " * (QUOTA + 10))                   # more tokens than the whole quota
        assert too_big.status_code == 429 and "more than the whole quota" in too_big.text, too_big.text
        ok = embed(c, "hello world")
        assert ok.status_code == 200, ok.text


def test_remote_endpoint_gives_the_same_vectors(srv, gateway, client):
    """A second real modelyard in front of the first: same bits, same errors, its own kind."""
    with httpx.Client(base_url=gateway.api, headers=gateway.headers, timeout=120) as g:
        assert vectors(embed(g, TEXTS, model="remote-minilm")) == vectors(embed(client, TEXTS))
        r = embed(g, [[101, 30522, 102]], model="remote-minilm")    # the upstream's 400 stays a 400
        assert r.status_code == 400 and "30522" in r.json()["error"]["message"], r.text
        r = g.post("/completions", json={"model": "remote-minilm", "prompt": "hi"})
        assert r.status_code == 400 and "is an embeddings endpoint" in r.text
        [m] = g.get("/models").json()["data"]
        assert (m["model_type"], m["model_engine"]) == ("EMBEDDINGS", "OPENAI_PROXY")
    assert gateway.wait_idle(fields=("in_flight",))["in_flight"] == 0


def test_readme_embeddings_example(srv):
    [code] = [b for b in re.findall(r"```python\n(.*?)```", README, re.S) if "embeddings.create" in b]
    code = code.replace("http://127.0.0.1:8000", srv.base).replace('api_key="none"', f'api_key="{KEY}"')
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    close, unrelated = map(float, out.stdout.split())
    assert close > unrelated + 0.2 and close > 0.5, out.stdout


def test_answers_and_errors_hold_to_openais_document(client):
    """OpenAI's published document (testkit/openai_document): float answers and an error body.
    (A base64 answer's `embedding` is a string, as OpenAI's own API sends it; the document says
    an array of floats only, so base64 is checked by the client test above, not here.)"""
    for extra in ({}, {"dimensions": 384}):
        r = embed(client, ["one text", "another"], **extra)
        assert r.status_code == 200, r.text
        conforms("CreateEmbeddingResponse", r.json())
    r = embed(client, "x", model="nope")
    assert r.status_code == 404
    conforms("ErrorResponse", r.json())
