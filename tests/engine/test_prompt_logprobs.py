"""echo + logprobs on gemma3 (262,144-token vocabulary): the memory it takes is bounded, and the
prompt's logprobs do not depend on how the prompt was chunked."""

from __future__ import annotations

import httpx
import pytest
from matrix import CHUNKED

from testkit.servers import ServerProcess

pytestmark = pytest.mark.model

MODEL = "gemma-q4_k"
PROMPT = "The history of the lighthouse keepers of the northern coast, " * 30   # ~400 tokens


def peak_rss_mib(pid: int) -> float:
    for line in open(f"/proc/{pid}/status"):
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    raise AssertionError("no VmHWM")


def scored(server: ServerProcess, model: str) -> dict:
    r = httpx.post(server.api + "/completions", headers=server.headers, timeout=600, json={
        "model": model, "prompt": PROMPT, "max_tokens": 1, "echo": True, "logprobs": 1, "temperature": 0})
    assert r.status_code == 200, r.text
    return r.json()


def endpoint(server: ServerProcess, model: str) -> dict:
    return httpx.get(f"{server.base}/api/v1/endpoints/{model}", headers=server.headers, timeout=10).json()


def test_echo_logprobs_memory_is_bounded_and_chunking_does_not_show(inv_server):
    assert inv_server.proc is not None
    before = peak_rss_mib(inv_server.proc.pid)
    body = scored(inv_server, MODEL)
    grew = peak_rss_mib(inv_server.proc.pid) - before
    lp = body["choices"][0]["logprobs"]
    n_prompt = body["usage"]["prompt_tokens"]
    assert n_prompt > 300 and len(lp["token_logprobs"]) == n_prompt + 1
    # A logits row per prompt token at once would be n_prompt MiB of output buffer, and as much
    # again in copies: > 600 MiB here. Scored 32 rows a step, it stays far below.
    status = endpoint(inv_server, MODEL)
    assert status["peak_logits_rows"] <= 32 + status["slots_total"]
    assert grew < 200, f"peak RSS grew {grew:.0f} MiB scoring a {n_prompt}-token prompt"
    other = scored(inv_server, MODEL + CHUNKED)["choices"][0]["logprobs"]
    assert other["token_logprobs"] == lp["token_logprobs"] and other["top_logprobs"] == lp["top_logprobs"]


def test_sixteen_echo_logprobs_prompts_share_one_step_bound(inv_server):
    """16 prompts with echo + logprobs in one request (issue 19, item 8): a step copies at most 32
    prompt rows over all of them (plus a row per other chunk), not 32 per prompt (4 slots here:
    128 rows, 128 MiB of gemma3's 262,144-wide rows a step; 512 with 16 slots), and each prompt's
    logprobs are what it gets alone."""
    prompts = [f"Lighthouse keeper {i} wrote in the log of the northern coast: " * 6 for i in range(16)]
    r = httpx.post(inv_server.api + "/completions", headers=inv_server.headers, timeout=600, json={
        "model": MODEL, "prompt": prompts, "max_tokens": 1, "echo": True, "logprobs": 1, "temperature": 0})
    assert r.status_code == 200, r.text
    choices = r.json()["choices"]
    assert len(choices) == 16 and all(len(c["logprobs"]["token_logprobs"]) > 60 for c in choices)
    status = endpoint(inv_server, MODEL)
    assert status["peak_step_logits_rows"] <= 32 + status["slots_total"], status["peak_step_logits_rows"]
    alone = httpx.post(inv_server.api + "/completions", headers=inv_server.headers, timeout=600, json={
        "model": MODEL, "prompt": prompts[5], "max_tokens": 1, "echo": True, "logprobs": 1, "temperature": 0})
    assert alone.json()["choices"][0]["logprobs"] == choices[5]["logprobs"]
