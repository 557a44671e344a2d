"""Routes passed through to a remote endpoint's upstream (api/openai/passthrough): a real gateway
(`modelyard serve`) in front of the scripted upstream (testkit.upstream), beside an embedded
endpoint; the official openai client for audio, httpx for the routes it lacks."""

from __future__ import annotations

import re
from typing import Iterator

import httpx
import openai
import pytest
from starlette.responses import JSONResponse, Response

from testkit.servers import served
from testkit.upstream import upstream

KEY = "pass-key"
LIMITED = "pass-limited"          # may see only the embedded endpoint
REMOTE, EMBEDDED = "remote", "smollm2-135m"


def answer(script: str, body: dict, request):
    path = script.removeprefix("passthrough:")
    if path == "/v1/rerank":
        if body["json"].get("query") == "fail":
            return JSONResponse({"error": {"message": "query too long for org/model"}}, status_code=400)
        return JSONResponse({"results": [{"index": 1, "relevance_score": 0.9}, {"index": 0, "relevance_score": 0.1}],
                             "usage": {"total_tokens": 17}})
    if path == "/v1/score":
        return JSONResponse({"data": [{"index": 0, "score": 0.5}], "usage": {"prompt_tokens": 9, "total_tokens": 9}})
    if path == "/classify":
        return JSONResponse({"data": [{"index": 0, "label": "positive"}]})
    if path == "/v1/audio/transcriptions":
        return JSONResponse({"text": "hello world",
                             "usage": {"type": "tokens", "input_tokens": 12, "output_tokens": 3, "total_tokens": 15}})
    if path == "/v1/audio/speech":
        return Response(b"ID3" + bytes(range(256)) * 40, media_type="audio/mpeg")
    return JSONResponse({"error": {"message": "Not Found"}}, status_code=404)


@pytest.fixture(scope="module")
def stack(tmp_path_factory) -> Iterator[tuple[str, list[dict]]]:
    with upstream(answer) as (url, seen):
        config = (f'[server]\napi_keys = ["{KEY}"]\nlog_level = "info"\n\n'
                  f'[[keys]]\nkey = "{LIMITED}"\nendpoints = ["{EMBEDDED}"]\n\n'
                  f'[[endpoints]]\nname = "{REMOTE}"\nengine = "openai"\nurls = ["{url}"]\n'
                  f'upstream_model = "org/model"\n\n'
                  f'[[endpoints]]\nname = "{EMBEDDED}"\nmodel = "{EMBEDDED}"\n'
                  f'context = 256\nparallel = 1\nthreads = 1\n')
        with served(tmp_path_factory.mktemp("passthrough"), config, name="gateway", key=KEY) as srv:
            yield srv, seen


def post(srv, path: str, body: dict, key: str = KEY) -> httpx.Response:
    return httpx.post(srv.api + path, json=body, headers={"Authorization": f"Bearer {key}"}, timeout=30)


def prompt_tokens(srv) -> float:
    m = re.search(rf'^modelyard_prompt_tokens_total{{endpoint="{REMOTE}"}} (\S+)$',
                  httpx.get(srv.base + "/metrics", timeout=10).text, re.MULTILINE)
    return float(m.group(1)) if m else 0.0


def test_rerank_and_score_pass_through_renamed_and_charged(stack):
    srv, seen = stack
    before = prompt_tokens(srv)
    r = post(srv, "/rerank", {"model": REMOTE, "query": "capital of France", "documents": ["Berlin", "Paris"]})
    assert r.status_code == 200, r.text
    assert r.json()["results"][0] == {"index": 1, "relevance_score": 0.9}
    sent = seen[-1]
    assert sent["path"] == "/v1/rerank" and sent["json"]["model"] == "org/model"
    assert sent["json"]["documents"] == ["Berlin", "Paris"]
    assert post(srv, "/score", {"model": REMOTE, "text_1": "a", "text_2": "b"}).json()["data"][0]["score"] == 0.5
    assert prompt_tokens(srv) == before + 17 + 9          # charged by what the upstream reported
    # vLLM's /classify lives at its root, not under /v1
    assert post(srv, "/classify", {"model": REMOTE, "input": ["great"]}).status_code == 200
    assert seen[-1]["path"] == "/classify"


def test_audio_uploads_and_speech_pass_through(stack):
    srv, seen = stack
    client = openai.OpenAI(base_url=srv.api, api_key=KEY, max_retries=0, timeout=30)
    before = prompt_tokens(srv)
    out = client.audio.transcriptions.create(model=REMOTE, file=("clip.wav", b"RIFF" + b"\0" * 2000, "audio/wav"),
                                             language="en")
    assert out.text == "hello world"
    sent = seen[-1]
    assert sent["path"] == "/v1/audio/transcriptions" and sent["content_type"].startswith("multipart/form-data")
    assert b'name="model"\r\n\r\norg/model' in sent["raw"] and b'name="language"\r\n\r\nen' in sent["raw"]
    assert b"RIFF" + b"\0" * 2000 in sent["raw"] and b'filename="clip.wav"' in sent["raw"]
    assert prompt_tokens(srv) == before + 12
    speech = client.audio.speech.create(model=REMOTE, voice="alloy", input="hello")
    assert speech.content == b"ID3" + bytes(range(256)) * 40
    assert seen[-1]["json"] == {"model": "org/model", "voice": "alloy", "input": "hello"}


def test_upstream_errors_are_mapped(stack):
    srv, _ = stack
    r = post(srv, "/rerank", {"model": REMOTE, "query": "fail", "documents": ["x"]})
    assert r.status_code == 400 and "query too long" in r.json()["error"]["message"]


def test_refusals(stack):
    srv, seen = stack
    n = len(seen)
    body = {"model": REMOTE, "query": "q", "documents": ["x"]}
    assert post(srv, "/rerank", body, key="wrong").status_code == 401
    # a key limited to other endpoints: the remote one is an unknown name
    r = post(srv, "/rerank", body, key=LIMITED)
    assert r.status_code == 404 and r.json()["error"]["message"].endswith(f"serves: {EMBEDDED}")
    # an embedded endpoint does not serve it: a 400 saying so
    r = post(srv, "/rerank", {**body, "model": EMBEDDED})
    assert r.status_code == 400 and r.json()["error"]["param"] == "model"
    assert "embedded engine" in r.json()["error"]["message"]
    r = post(srv, "/score", {"text_1": "a"})
    assert r.status_code == 400 and r.json()["error"]["param"] == "model"
    r = post(srv, "/score", {"model": "m" * 300})
    assert r.status_code == 422 and r.json()["detail"][0]["loc"] == ["body", "model"]
    r = httpx.post(srv.api + "/audio/transcriptions", json={"model": REMOTE},
                   headers={"Authorization": f"Bearer {KEY}"}, timeout=30)
    assert r.status_code == 400 and "multipart/form-data" in r.json()["error"]["message"]
    # routes nobody serves stay 404, and nothing reached the upstream
    assert post(srv, "/v1/unknown", body).status_code == 404
    assert post(srv, "/audio/other", body).status_code == 404
    assert len(seen) == n
