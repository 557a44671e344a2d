"""OpenAI's legacy logprobs contract, on smollm2's and gemma3's tokenizers, over HTTP:
top_logprobs hold the sampled token (up to logprobs + 1 entries), logprobs 0 is the sampled
token's logprob and its own entry, and with echo every token's text_offset points at its text in
the echoed text, control tokens written in the prompt included."""

from __future__ import annotations

import httpx
import pytest

from testkit.servers import ServerProcess

pytestmark = pytest.mark.model

ENDPOINTS = ("smol-q4_1", "gemma-q4_k")
CONTROL = {"smol-q4_1": "<|im_start|>user\nSay hi<|im_end|>\n", "gemma-q4_k": "<start_of_turn>user\nSay hi<end_of_turn>\n"}
PROMPT = "Hello  world, café 🙂 naïve\n\tx, 日本語"


def complete(server: ServerProcess, **body) -> dict:
    r = httpx.post(server.api + "/completions", headers=server.headers, timeout=300,
                   json={"temperature": 0, **body})
    assert r.status_code == 200, r.text
    return r.json()


@pytest.mark.parametrize("model", ENDPOINTS)
def test_echoed_text_offsets_point_at_each_tokens_text(inv_server, model):
    prompt = CONTROL[model] + PROMPT
    body = complete(inv_server, model=model, prompt=prompt, max_tokens=4, echo=True, logprobs=1)
    ch = body["choices"][0]
    lp, text = ch["logprobs"], ch["text"]
    assert text.startswith(prompt)
    n = len(lp["tokens"])
    assert n == body["usage"]["prompt_tokens"] + body["usage"]["completion_tokens"]
    ends = lp["text_offset"][1:] + [len(text)]
    whole = [i for i, t in enumerate(lp["tokens"]) if not t.startswith("bytes:")]
    assert len(whole) > n // 2
    for i in whole:
        assert text[lp["text_offset"][i]:ends[i]] == lp["tokens"][i], (i, lp["tokens"][i], lp["text_offset"][i])


@pytest.mark.parametrize("model", ENDPOINTS)
def test_logprobs_zero_gives_the_sampled_tokens_own_entry(inv_server, model):
    lp = complete(inv_server, model=model, prompt=PROMPT, max_tokens=4, logprobs=0)["choices"][0]["logprobs"]
    assert len(lp["tokens"]) == 4
    for tok, v, top in zip(lp["tokens"], lp["token_logprobs"], lp["top_logprobs"]):
        assert isinstance(v, float) and v <= 0
        assert top == {tok: v}


@pytest.mark.parametrize("model", ENDPOINTS)
def test_top_logprobs_include_the_sampled_token_when_sampling(inv_server, model):
    """logit_bias forces token 30000, which the raw row does not rank among its 2 best: it is
    added to them (3 entries), with its raw logprob, not the biased one."""
    lp = complete(inv_server, model=model, prompt=PROMPT, max_tokens=6, logprobs=2,
                  logit_bias={"30000": 100})["choices"][0]["logprobs"]
    sizes = set()
    for tok, v, top in zip(lp["tokens"], lp["token_logprobs"], lp["top_logprobs"]):
        assert top[tok] == pytest.approx(v), (tok, top)
        assert len(top) in (2, 3)
        sizes.add(len(top))
    assert 3 in sizes, lp["top_logprobs"]


BYTE_TOKEN = {"smol-q4_1": (111, 0xA1), "gemma-q4_k": (366, 0x80)}   # pieces of one raw byte


@pytest.mark.parametrize("model", ENDPOINTS)
def test_chat_bytes_are_the_tokens_raw_bytes(inv_server, model):
    """A token that is a lone UTF-8 continuation byte (forced by logit_bias) gives that one byte
    in chat's `bytes`, not the UTF-8 of its "bytes:\\xa1" display string."""
    token, byte = BYTE_TOKEN[model]
    r = httpx.post(inv_server.api + "/chat/completions", headers=inv_server.headers, timeout=300, json={
        "model": model, "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 2, "temperature": 0,
        "logprobs": True, "top_logprobs": 1, "logit_bias": {str(token): 100}})
    assert r.status_code == 200, r.text
    content = r.json()["choices"][0]["logprobs"]["content"]
    assert content and content[0]["token"] == f"bytes:\\x{byte:02x}", content[0]
    assert content[0]["bytes"] == [byte], content[0]
    for item in content:
        assert len(item["top_logprobs"]) <= 1            # chat: the k best only
        for alt in item["top_logprobs"]:
            assert alt["bytes"] == list(alt["token"].encode()) or alt["token"].startswith("bytes:")
