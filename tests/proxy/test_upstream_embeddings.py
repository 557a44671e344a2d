"""/embeddings through a real `modelyard serve` gateway to a scripted OpenAI-style upstream (a tiny
server in this process, on loopback: testkit.upstream): what the official client and plain HTTP see, how upstream
failures map, the endpoint kinds, quotas, metrics and the request log. The first input picks the
script. (The same through a second real modelyard serving minilm-l6-v2: tests/api/test_embeddings.py.)
"""

from __future__ import annotations

import asyncio
import base64
import json
import struct
from typing import Iterator

import httpx
import pytest

from testkit.servers import served
from testkit.until import until
from testkit.upstream import upstream as scripted_upstream

KEY = "gateway-key"
QUOTA_KEY = "quota-key"          # tpm = 40
SECRET = "sk-upstream-embed-0123456789"
EMBED, CHAT = "remote-embed", "remote-chat"
MAX_INPUTS = 4

ERRORS = {
    "401": (401, {"error": {"message": f"Incorrect API key provided: {SECRET}.", "type": "invalid_request_error"}}),
    "404": (404, {"error": {"message": "The model `org/embedder` does not exist"}}),
    "400": (400, {"error": {"message": "input is too long for this model"}}),
    "429": (429, {"error": {"message": "slow down"}}),
}


def vector(text: str) -> list[float]:
    """What the upstream answers for `text`: float32-exact values, so round trips compare equal."""
    return [float(len(text)), 0.5, -0.25, ord(text[0]) / 8]


async def _answer(script: str, body: dict, request):
    from starlette.responses import JSONResponse, Response

    texts = [x if isinstance(x, str) else "t" * len(x) for x in body["input"]]
    if script in ERRORS:
        status, payload = ERRORS[script]
        return JSONResponse(payload, status_code=status)
    if script == "slow":                     # until the gateway hangs up (at most 3 s)
        for _ in range(60):
            if await request.is_disconnected():
                body["hung_up"] = True
                return Response(status_code=499)
            await asyncio.sleep(0.05)
    vectors = [vector(t) for t in texts]
    if script == "short":
        vectors = vectors[:-1]
    if script == "ragged":
        vectors[-1] = vectors[-1][:2]
    if script == "nan":
        vectors[0][1] = float("nan")         # json.dumps writes NaN, as some servers do
    as_floats = script in ("floats", "nan") or body.get("encoding_format") != "base64"
    data = [{"object": "embedding", "index": i,
             "embedding": v if as_floats else base64.b64encode(struct.pack(f"<{len(v)}f", *v)).decode()}
            for i, v in enumerate(vectors)]
    if script == "reversed":
        data.reverse()
    tokens = sum(len(t.split()) for t in texts)
    payload = json.dumps({"object": "list", "data": data, "model": body["model"],
                          "usage": {"prompt_tokens": tokens, "total_tokens": tokens}})
    return Response(payload, media_type="application/json")


@pytest.fixture(scope="module")
def upstream() -> Iterator[tuple[str, list[dict]]]:
    with scripted_upstream(_answer, model="org/embedder") as (url, seen):
        yield url, seen


@pytest.fixture(scope="module")
def gateway(upstream, tmp_path_factory):
    url, _ = upstream
    config = f"""\
[server]
api_keys = ["{KEY}"]
log_level = "info"

[[keys]]
key = "{QUOTA_KEY}"
tpm = 40

[limits]
max_embedding_inputs = {MAX_INPUTS}

[[endpoints]]
name = "{EMBED}"
engine = "openai"
kind = "embeddings"
urls = ["{url}"]
upstream_model = "org/embedder"
api_key = "{SECRET}"

[[endpoints]]
name = "{CHAT}"
engine = "openai"
urls = ["{url}"]
"""
    with served(tmp_path_factory.mktemp("upstream-embed"), config, name="gateway", key=KEY) as srv:
        srv.model = EMBED
        yield srv


@pytest.fixture(scope="module")
def client(gateway) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=gateway.api, headers=gateway.headers, timeout=30) as c:
        yield c


def embed(client: httpx.Client, input, **extra) -> httpx.Response:
    return client.post("/embeddings", json={"model": EMBED, "input": input, **extra})


def test_official_client_round_trips_base64(gateway, upstream):
    openai = pytest.importorskip("openai")
    client = openai.OpenAI(base_url=gateway.api, api_key=KEY, max_retries=0)
    texts = ["hello world", "a", "embeddings are vectors"]
    out = client.embeddings.create(model=EMBED, input=texts)      # the client asks for base64 and decodes it
    assert [d.embedding for d in out.data] == [vector(t) for t in texts]
    assert [d.index for d in out.data] == [0, 1, 2] and out.model == EMBED
    assert out.usage.prompt_tokens == 6 and out.usage.total_tokens == 6
    _, seen = upstream
    assert seen[-1]["model"] == "org/embedder" and seen[-1]["input"] == texts
    assert seen[-1]["encoding_format"] == "base64" and "dimensions" not in seen[-1] and "truncate" not in seen[-1]


def test_float_and_base64_bodies_in_openais_shape(client):
    r = embed(client, "hello")
    assert r.status_code == 200, r.text
    assert r.json() == {"object": "list", "model": EMBED, "usage": {"prompt_tokens": 1, "total_tokens": 1},
                        "data": [{"object": "embedding", "index": 0, "embedding": vector("hello")}]}
    r = embed(client, ["hello", "hi"], encoding_format="base64")
    data = r.json()["data"]
    assert [struct.unpack("<4f", base64.b64decode(d["embedding"])) for d in data] == \
        [tuple(vector("hello")), tuple(vector("hi"))]


def test_token_id_inputs_and_options_pass_through(client, upstream):
    _, seen = upstream
    assert embed(client, [1, 2, 3], dimensions=4, truncate=True).status_code == 200
    assert seen[-1]["input"] == [[1, 2, 3]] and seen[-1]["dimensions"] == 4 and seen[-1]["truncate"] is True
    r = embed(client, [[5, 6], [7]])
    assert r.status_code == 200 and [d["embedding"] for d in r.json()["data"]] == [vector("tt"), vector("t")]
    assert seen[-1]["input"] == [[5, 6], [7]]


def test_answers_in_floats_or_out_of_order_are_read(client):
    r = embed(client, ["floats", "b"])
    assert [d["embedding"] for d in r.json()["data"]] == [vector("floats"), vector("b")]
    r = embed(client, ["reversed", "b", "cc"])
    assert [d["embedding"] for d in r.json()["data"]] == [vector("reversed"), vector("b"), vector("cc")]


@pytest.mark.parametrize("script", ["401", "404"])
def test_upstream_rejecting_our_config_is_502(client, script):
    r = embed(client, [script, "x"])
    assert r.status_code == 502, r.text
    err = r.json()["error"]
    assert err["code"] == "upstream_misconfigured" and f"HTTP {script}" in err["message"]
    assert SECRET not in r.text and "sk-upstream" not in r.text


def test_upstream_client_errors_keep_their_status(client):
    r = embed(client, "400")
    assert r.status_code == 400 and "input is too long" in r.json()["error"]["message"], r.text
    assert embed(client, "429").status_code == 429


@pytest.mark.parametrize("script,why", [("short", "1 vectors for 2 inputs"), ("ragged", "sizes [2, 4]"),
                                        ("nan", "NaN")])
def test_a_malformed_upstream_answer_is_a_502(client, script, why):
    r = embed(client, [script, "x"], dimensions=None)
    assert r.status_code == 502, r.text
    assert "malformed embeddings answer" in r.json()["error"]["message"] and why in r.json()["error"]["message"]


def test_an_upstream_ignoring_dimensions_is_a_502(client):
    r = embed(client, "hello", dimensions=2)
    assert r.status_code == 502 and "4 dimensions where 2 were asked for" in r.text, r.text


def test_the_deadline_bounds_the_upstream_wait(client, gateway):
    r = client.post("/embeddings", json={"model": EMBED, "input": "slow"}, headers={"X-Request-Timeout": "0.3"})
    assert r.status_code == 504 and r.json()["error"]["type"] == "timeout_error", r.text
    assert gateway.wait_idle(fields=("in_flight",))["in_flight"] == 0


def test_a_client_that_leaves_cancels_the_upstream_request(gateway, upstream):
    _, seen = upstream
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(f"{gateway.api}/embeddings", json={"model": EMBED, "input": ["slow", "leaving"]},
                   headers=gateway.headers, timeout=httpx.Timeout(0.5, connect=5))
    assert gateway.wait_idle(fields=("in_flight",))["in_flight"] == 0
    [mine] = [b for b in seen if b["input"] == ["slow", "leaving"]]
    # the upstream notices within its 50 ms poll
    until(lambda: mine.get("hung_up") is True, 2, "the upstream saw the gateway hang up", interval=0.05)


def test_cross_kind_requests_are_400s(client):
    r = client.post("/completions", json={"model": EMBED, "prompt": "hi"})
    assert r.status_code == 400, r.text
    assert r.json()["error"]["message"] == (f"model endpoint '{EMBED}' is an embeddings endpoint: it serves "
                                            "/embeddings, not /completions")
    assert r.json()["error"]["param"] == "model" and r.json()["error"]["code"] == "wrong_model_type"
    r = client.post("/chat/completions", json={"model": EMBED, "messages": [{"role": "user", "content": "hi"}]})
    assert r.status_code == 400 and "is an embeddings endpoint" in r.text and "/chat/completions" in r.text
    r = client.post("/embeddings", json={"model": CHAT, "input": "hi"})
    assert r.status_code == 400, r.text
    assert r.json()["error"]["message"] == (f"model endpoint '{CHAT}' is a completions endpoint: it serves "
                                            "/completions and /chat/completions, not /embeddings")
    assert embed(client, "x", model="nope").status_code == 404


def test_bad_bodies_are_422s_naming_the_field(client):
    for body, field in [({"input": ""}, "input"), ({"input": ["a", ""]}, "input"), ({"input": []}, "input"),
                        ({"input": [-1]}, "input"), ({"input": "a", "encoding_format": "int8"}, "encoding_format"),
                        ({"input": "a", "dimensions": 0}, "dimensions"), ({}, "input")]:
        r = client.post("/embeddings", json={"model": EMBED, **body})
        assert r.status_code == 422, (body, r.text)
        assert any(d["loc"][:2] == ["body", field] for d in r.json()["detail"]), (body, r.text)
    r = embed(client, ["a", ""])
    assert "input 1 is an empty string" in r.text


def test_the_key_is_required_and_user_is_accepted(gateway, client):
    r = httpx.post(f"{gateway.api}/embeddings", json={"model": EMBED, "input": "a"}, timeout=10)
    assert r.status_code == 401 and r.json()["error"]["type"] == "authentication_error"
    r = httpx.post(f"{gateway.base}/v1/embeddings", json={"model": EMBED, "input": "a", "user": "u-1"},
                   headers=gateway.headers, timeout=10)          # the /v1 alias
    assert r.status_code == 200 and r.json()["data"][0]["embedding"] == vector("a"), r.text


def test_too_many_inputs_is_a_422_naming_the_limit(client):
    r = embed(client, ["x"] * (MAX_INPUTS + 1))
    assert r.status_code == 422, r.text
    [d] = r.json()["detail"]
    assert d["loc"] == ["body", "input"] and d["ctx"] == {"le": MAX_INPUTS}
    assert d["msg"] == f"the number of inputs is {MAX_INPUTS + 1}, above this server's limit of {MAX_INPUTS}"
    assert embed(client, ["x"] * MAX_INPUTS).status_code == 200


def test_models_and_endpoints_show_type_and_engine(gateway, client):
    by_id = {m["id"]: m for m in client.get("/models").json()["data"]}
    assert (by_id[EMBED]["model_type"], by_id[EMBED]["model_engine"]) == ("EMBEDDINGS", "OPENAI_PROXY")
    assert (by_id[CHAT]["model_type"], by_id[CHAT]["model_engine"]) == ("COMPLETIONS", "OPENAI_PROXY")
    eps = {e["name"]: e for e in httpx.get(f"{gateway.base}/api/v1/endpoints", headers=gateway.headers).json()["endpoints"]}
    assert (eps[EMBED]["model_type"], eps[EMBED]["model_engine"]) == ("EMBEDDINGS", "OPENAI_PROXY")
    assert eps[CHAT]["model_type"] == "COMPLETIONS"


def test_prompt_tokens_count_against_the_tpm_quota(gateway):
    """The gateway reserves a bound before going upstream (27 bytes + 2 = 29 here), then settles
    to what the upstream counted (6, one per word), or 0 when the upstream refused."""
    six = "one two three four five six"
    with httpx.Client(base_url=gateway.api, headers={"Authorization": f"Bearer {QUOTA_KEY}"}, timeout=30) as c:
        assert embed(c, six).status_code == 200
        assert embed(c, six).status_code == 200          # 6 + 29 fits in 40: the first was settled to 6
        assert embed(c, "400").status_code == 400         # refused upstream: costs nothing
        third = embed(c, six)                             # 12 + 29 does not fit
        assert third.status_code == 429, third.text
        assert "(12 used in the last minute)" in third.json()["error"]["message"], third.text
        whole = embed(c, "x" * 50)
        assert whole.status_code == 429 and "more than the whole quota" in whole.text


def _scrape(gateway) -> dict[str, float]:
    text = httpx.get(f"{gateway.base}/metrics", timeout=10).text
    return {line.rsplit(" ", 1)[0]: float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
            if line and not line.startswith("#")}


def test_metrics_and_the_request_log(gateway, client):
    before = _scrape(gateway)
    assert embed(client, ["count these words", "and these"]).status_code == 200
    after = _scrape(gateway)
    inputs = f'modelyard_embedding_inputs_total{{endpoint="{EMBED}"}}'
    tokens = f'modelyard_prompt_tokens_total{{endpoint="{EMBED}"}}'
    route = (f'modelyard_requests_total{{endpoint="{EMBED}",route="/api/v1/compatibility/openai/v1/embeddings",'
             f'status="200"}}')
    assert after[inputs] - before.get(inputs, 0) == 2
    assert after[tokens] - before.get(tokens, 0) == 5
    assert after[route] - before.get(route, 0) == 1
    lines = [json.loads(line[line.index("{"):]) for line in gateway.log_text().splitlines()
             if '"route": "/api/v1/compatibility/openai/v1/embeddings"' in line]
    assert lines and lines[-1]["endpoint"] == EMBED and lines[-1]["status"] == 200
    assert lines[-1]["inputs"] == 2 and lines[-1]["prompt_tokens"] == 5 and lines[-1]["id"].startswith("embd-")
    assert "count these words" not in gateway.log_text()          # sizes and ids, never the inputs
