"""Several model endpoints side by side in ONE gateway process, from one TOML config:

    smollm2-135m   embedded llama.cpp (the default model)
    gemma3-270m    embedded llama.cpp (a second architecture)
    remote-smol    engine "openai": a SECOND modelyard process serving smollm2-135m upstream

Both processes use the same engine settings for smollm2-135m (parallel 2, context 512, one
thread), so greedy text through the remote endpoint must equal the embedded endpoint's.
Every process listens on loopback only and is stopped by its PID.
"""

from __future__ import annotations

from typing import Iterator

import httpx
import pytest

from testkit.servers import ServerProcess, served, side_by_side_config
from testkit.until import until

openai = pytest.importorskip("openai")
from prometheus_client.parser import text_string_to_metric_families  # noqa: E402

pytestmark = pytest.mark.model

KEY = "multi-key"
TPM_KEY, TPM = "sk-remote-tpm", 3 * 16 + 8     # room for three requests of 10 + 6 tokens, not four
SMOL, GEMMA, REMOTE = "smollm2-135m", "gemma3-270m", "remote-smol"
NAMES = (SMOL, GEMMA, REMOTE)
PROMPT = "The capital of France is"
ENGINE = "context = 512\nparallel = 2\nthreads = 1\n"


# -- processes ------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def upstream(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    with served(tmp_path_factory.mktemp("multi"),
                f'[server]\nlog_level = "info"\n\n[[endpoints]]\nname = "{SMOL}"\nmodel = "{SMOL}"\n{ENGINE}',
                name="upstream") as p:
        yield p


@pytest.fixture(scope="module")
def gateway(upstream: ServerProcess, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    # served() waits for /ready: all three endpoints
    config = side_by_side_config(KEY, upstream.base + "/v1") + f'\n[[keys]]\nkey = "{TPM_KEY}"\ntpm = {TPM}\n'
    with served(tmp_path_factory.mktemp("multi-gw"), config, name="gateway", key=KEY) as p:
        yield p


@pytest.fixture(scope="module")
def client(gateway: ServerProcess):
    with openai.OpenAI(base_url=gateway.api, api_key=KEY, max_retries=0, timeout=60) as c:
        yield c


@pytest.fixture(scope="module")
def admin(gateway: ServerProcess) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=gateway.base, headers={"Authorization": f"Bearer {KEY}"}, timeout=30) as c:
        yield c


# -- the tests ------------------------------------------------------------------------------------

def test_openai_client_lists_all_three_with_state(client):
    assert {m.id for m in client.models.list()} == set(NAMES)
    raw = client.models.with_raw_response.list()
    body = raw.http_response.json()
    by_id = {m["id"]: m for m in body["data"]}
    assert set(by_id) == set(NAMES)
    for name, m in by_id.items():
        assert m["object"] == "model" and m["state"] == "ready" and m["ready"] is True, (name, m)


@pytest.mark.parametrize("name", NAMES)
def test_completes_on_each_endpoint_streaming_and_not(client, name):
    done = client.completions.create(model=name, prompt=PROMPT, max_tokens=8, temperature=0)
    assert done.model == name
    text = done.choices[0].text
    assert text and done.choices[0].finish_reason in ("length", "stop")
    assert 1 <= done.usage.completion_tokens <= 8 and done.usage.prompt_tokens > 0

    chunks = list(client.completions.create(model=name, prompt=PROMPT, max_tokens=8, temperature=0,
                                            stream=True, stream_options={"include_usage": True}))
    assert chunks and all(c.model == name for c in chunks)
    assert "".join(c.choices[0].text for c in chunks if c.choices) == text
    assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens == done.usage.completion_tokens


@pytest.mark.parametrize("name", NAMES)
def test_chat_on_each_endpoint(client, name):
    done = client.chat.completions.create(model=name, messages=[{"role": "user", "content": "Say hello."}],
                                          max_tokens=6, temperature=0)
    assert done.model == name and done.choices[0].message.role == "assistant"
    assert done.usage.completion_tokens <= 6


def test_remote_greedy_text_equals_embedded(client):
    prompt = "Once upon a time, in a small village,"
    texts = {}
    for name in (SMOL, REMOTE):
        done = client.completions.create(model=name, prompt=prompt, max_tokens=16, temperature=0)
        assert done.model == name
        texts[name] = done.choices[0].text
    assert texts[REMOTE] == texts[SMOL] and texts[SMOL]
    # and the remote stream, re-framed under the routing name, carries the same text
    chunks = list(client.completions.create(model=REMOTE, prompt=prompt, max_tokens=16, temperature=0,
                                            stream=True))
    assert {c.model for c in chunks} == {REMOTE}
    assert "".join(c.choices[0].text for c in chunks if c.choices) == texts[SMOL]


def test_endpoints_route_shows_engine_state_and_replicas(admin, upstream):
    r = admin.get("/api/v1/endpoints")
    assert r.status_code == 200, r.text
    eps = {e["name"]: e for e in r.json()["endpoints"]}
    assert set(eps) == set(NAMES)
    for name in (SMOL, GEMMA):
        ep = eps[name]
        assert ep["engine"] == "llamacpp" and ep["state"] == "ready" and ep["ready"] is True, ep
        assert ep["model"] == name and ep["model_path"].endswith(f"{name}.gguf")
        assert ep["slots_total"] == 2 and "queue_depth" in ep and "in_flight" in ep
    remote = eps[REMOTE]
    assert remote["engine"] == "openai" and remote["state"] == "ready" and remote["ready"] is True, remote
    assert remote["model"] == SMOL
    assert [(x["url"], x["healthy"], x["last_error"]) for x in remote["replicas"]] == \
        [(upstream.base + "/v1", True, None)]
    single = admin.get(f"/api/v1/endpoints/{REMOTE}")
    assert single.status_code == 200 and single.json()["replicas"][0]["healthy"] is True


def _samples(text: str) -> list[tuple[str, dict, float]]:
    return [(s.name, s.labels, s.value) for fam in text_string_to_metric_families(text) for s in fam.samples]


def _value(samples, name: str, **labels) -> float:
    """The sum over the samples called `name` whose labels include `labels` (0 when none)."""
    return sum(v for n, lab, v in samples if n == name and all(lab.get(k) == x for k, x in labels.items()))


def test_metrics_per_endpoint(client, gateway, admin):
    for name in NAMES:
        client.completions.create(model=name, prompt=PROMPT, max_tokens=4, temperature=0)
        list(client.completions.create(model=name, prompt=PROMPT, max_tokens=4, temperature=0, stream=True))
        assert admin.get(f"/api/v1/endpoints/{name}").status_code == 200
    with pytest.raises(openai.NotFoundError):
        client.completions.create(model="not-configured", prompt=PROMPT, max_tokens=1)
    # The request counter is bumped once the response has fully ended, a moment after the
    # client has the last byte: poll briefly.
    def counted() -> list | None:
        r = httpx.get(gateway.base + "/metrics", timeout=10)      # open, like /health
        assert r.status_code == 200
        samples = _samples(r.text)
        return samples if all(_value(samples, "modelyard_requests_total", endpoint=n, status="200") >= 2
                              for n in NAMES) \
            and _value(samples, "modelyard_requests_total", endpoint="unknown") >= 1 else None
    samples = until(counted, 10, "every request counted", interval=0.2)
    for name in NAMES:
        assert _value(samples, "modelyard_requests_total", endpoint=name, status="200") >= 2, name
        # Labels are route templates and configured names, never what the client typed.
        assert _value(samples, "modelyard_requests_total", endpoint=name,
                      route="/api/v1/compatibility/openai/v1/completions") >= 2, name
        assert not [lab for n, lab, _ in samples if name in lab.get("route", "")], name
        assert _value(samples, "modelyard_prompt_tokens_total", endpoint=name) > 0, name
        assert _value(samples, "modelyard_completion_tokens_total", endpoint=name) >= 8, name
        assert _value(samples, "modelyard_time_to_first_token_seconds_count", endpoint=name) >= 2, name
        assert _value(samples, "modelyard_time_to_first_token_seconds_bucket", endpoint=name, le="+Inf") >= 2
        assert _value(samples, "modelyard_time_per_output_token_seconds_count", endpoint=name) >= 2, name
        assert _value(samples, "modelyard_request_duration_seconds_count", endpoint=name) >= 2, name
        assert _value(samples, "modelyard_endpoint_ready", endpoint=name, state="ready") == 1.0, name
        for gauge in ("modelyard_queue_depth", "modelyard_in_flight"):
            found = [v for n, lab, v in samples if n == gauge and lab.get("endpoint") == name]
            assert found == [0.0], (gauge, name, found)        # idle now
    assert _value(samples, "modelyard_requests_total", route="/api/v1/endpoints/{name}", status="200") >= 3
    assert _value(samples, "modelyard_requests_total", endpoint="unknown", status="404") >= 1
    assert not [lab for n, lab, _ in samples if "not-configured" in lab.values()]


# -- vLLM's tokenizer routes, per endpoint ----------------------------------------------------------

def test_tokenize_answers_each_embedded_endpoint_with_its_own_tokenizer(admin, client):
    """gemma3's tokenizer adds a BOS, smollm2's does not: add_special_tokens decides it, and the
    tokens are what /completions feeds the model (its usage counts them)."""
    for name, has_bos in ((SMOL, False), (GEMMA, True)):
        info = admin.get("/tokenizer_info", params={"model": name}).json()
        assert info["add_bos_token"] is has_bos and info["model_max_length"] == 512, info
        with_special = admin.post("/tokenize", json={"model": name, "prompt": PROMPT}).json()
        plain = admin.post("/tokenize", json={"model": name, "prompt": PROMPT, "add_special_tokens": False}).json()
        assert with_special["tokens"][1 if has_bos else 0:] == plain["tokens"], (name, with_special, plain)
        assert len(with_special["tokens"]) - len(plain["tokens"]) == int(has_bos)
        usage = client.completions.create(model=name, prompt=PROMPT, max_tokens=1).usage
        assert usage.prompt_tokens == with_special["count"], name
        back = admin.post("/detokenize", json={"model": name, "tokens": plain["tokens"]}).json()
        assert back == {"prompt": PROMPT}


def test_tokenize_needs_a_model_when_several_endpoints_and_refuses_a_remote_one(admin):
    r = admin.post("/tokenize", json={"prompt": PROMPT})
    assert r.status_code == 400 and r.json()["error"]["param"] == "model", r.text
    assert "2 embedded completions endpoints" in r.json()["error"]["message"]
    r = admin.get("/tokenizer_info", params={"model": REMOTE})
    assert r.status_code == 400 and "remote engine" in r.json()["error"]["message"], r.text


# -- quotas on a remote endpoint -------------------------------------------------------------------

def test_tpm_holds_on_a_remote_endpoint(gateway):
    """The upstream counts the tokens, yet the key's tpm is reserved before the request goes
    upstream and settled to the upstream's usage: the fourth request of 16 tokens does not fit.
    Chat without max_tokens reserves the endpoint's context per choice, more than this key has."""
    api, auth = gateway.api, {"Authorization": f"Bearer {TPM_KEY}"}
    chat = httpx.post(f"{api}/chat/completions", headers=auth, timeout=60,
                      json={"model": REMOTE, "messages": [{"role": "user", "content": "Hi"}]})
    assert chat.status_code == 429 and f"{TPM} tokens per minute" in chat.json()["error"]["message"], chat.text
    body = {"model": REMOTE, "prompt": list(range(1000, 1010)), "max_tokens": 6,
            "logit_bias": {"0": -100, "1": -100, "2": -100}}     # no end token: exactly 10 + 6 tokens
    for i in range(3):
        r = httpx.post(f"{api}/completions", headers=auth, json=body, timeout=60)
        assert r.status_code == 200, (i, r.text)
        assert r.json()["usage"]["total_tokens"] == 16
    r = httpx.post(f"{api}/completions", headers=auth, json=body, timeout=60)
    assert r.status_code == 429 and f"{TPM} tokens per minute" in r.json()["error"]["message"], r.text
