"""vLLM's tokenizer routes at the server root (/tokenize, /detokenize, /tokenizer_info) on the
session server (smollm2-135m and the failed `broken` endpoint), over real HTTP."""

from __future__ import annotations

import httpx
import pytest

from testkit.servers import MODEL

pytestmark = pytest.mark.model

TEXT = "Héllo wörld, 東京 — fine? <|im_end|>"


@pytest.fixture(scope="module")
def root(server):
    with httpx.Client(base_url=server.base, headers=server.headers, timeout=30) as c:
        yield c


def test_tokens_are_what_completions_feeds_the_model_and_come_back_as_the_text(root, client):
    r = root.post("/tokenize", json={"model": MODEL, "prompt": TEXT, "return_token_strs": True})
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["count"] == len(body["tokens"]) == len(body["token_strs"]) and body["max_model_len"] == 512
    assert body["tokens"][-1] == 2 and body["token_strs"][-1] == "<|im_end|>"   # parsed as the special token
    usage = client.post("/completions", json={"model": MODEL, "prompt": TEXT, "max_tokens": 1}).json()["usage"]
    assert usage["prompt_tokens"] == body["count"]
    back = root.post("/detokenize", json={"model": MODEL, "tokens": body["tokens"]})
    # the special token renders empty, as in generated text
    assert back.status_code == 200 and back.json() == {"prompt": TEXT.removesuffix("<|im_end|>")}, back.text


def test_chat_messages_tokenize_as_chat_completions_renders_them(root, client):
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi <|im_start|>"}]
    r = root.post("/tokenize", json={"model": MODEL, "messages": messages})
    assert r.status_code == 200, r.text
    usage = client.post("/chat/completions", json={"model": MODEL, "messages": messages, "max_tokens": 1}).json()
    assert usage["usage"]["prompt_tokens"] == r.json()["count"]
    # the user's "<|im_start|>" is text, not a turn marker (chat_parse_special is off)
    assert r.json()["tokens"].count(1) == 3          # system, user, assistant turns


def test_tokenizer_info_names_the_special_tokens_and_the_template(root):
    info = root.get("/tokenizer_info", params={"model": MODEL}).json()
    assert info["eos_token"] == "<|im_end|>" and info["bos_token"] == "<|im_start|>"
    assert info["tokenizer_class"] == "llama.cpp:bpe" and info["vocab_size"] == 49152
    assert "<|im_start|>" in info["chat_template"] and info["model_max_length"] == 512


@pytest.mark.parametrize("method, path, body, status, param, words", [
    ("post", "/tokenize", {"prompt": "x"}, 400, "model", "2 embedded completions endpoints"),
    ("post", "/tokenize", {"model": "nope", "prompt": "x"}, 404, "model", "unknown model endpoint 'nope'"),
    ("post", "/tokenize", {"model": "broken", "prompt": "x"}, 400, "model", "not ready"),
    ("post", "/detokenize", {"model": MODEL, "tokens": [49152]}, 400, "tokens",
     "token 49152, which is outside the vocabulary (0..49151)"),
    ("post", "/detokenize", {"model": MODEL, "tokens": [-3]}, 400, "tokens", "token -3, which is outside"),
    ("get", "/tokenizer_info", None, 400, "model", "name one"),
    # what completions would refuse (context 512): the answer is bounded by the context
    ("post", "/tokenize", {"model": MODEL, "prompt": " dragon" * 600}, 400, "prompt",
     "context is 512 tokens, and the prompt has 600 tokens"),
    ("post", "/tokenize", {"model": MODEL, "messages": [{"role": "user", "content": " dragon" * 600}]}, 400,
     "messages", "context is 512 tokens, and the messages make"),
])
def test_errors_name_the_field(root, method, path, body, status, param, words):
    r = root.request(method.upper(), path, json=body)
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert err["param"] == param and words in err["message"], err


def test_unsupported_chat_options_are_422_not_ignored(root):
    r = root.post("/tokenize", json={"model": MODEL, "messages": [{"role": "user", "content": "hi"}],
                                     "add_generation_prompt": False})
    assert r.status_code == 422
    assert any(e["loc"][-1] == "add_generation_prompt" for e in r.json()["detail"]), r.text


def test_the_routes_need_a_key(server):
    for method, path in (("POST", "/tokenize"), ("POST", "/detokenize"), ("GET", "/tokenizer_info")):
        r = httpx.request(method, server.base + path, json={"model": MODEL, "prompt": "x", "tokens": [1]}, timeout=10)
        assert r.status_code == 401, (path, r.text)
