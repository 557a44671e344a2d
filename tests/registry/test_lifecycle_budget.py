"""Models that load on demand under a memory budget, over real HTTP with real models (issue 24).

One server, three store models as `load = "on_demand"` endpoints under a budget that holds two
of them (needs from their GGUFs at these shapes: smol ~214 MiB,
gemma ~424 MiB, minilm ~98 MiB; budget 680 MiB: any two, not three). The tests run in order, each from the state the last
left (module scope: every load costs seconds on a busy machine):

  nothing loaded -> concurrent first requests load smol once -> minilm beside it -> gemma evicts
  smol (the least recently used), not minilm -> a long stream on gemma keeps it: loading smol
  evicts minilm instead -> with gemma and smol both busy, minilm gets a 503 naming the budget.
"""

from __future__ import annotations

import concurrent.futures
import threading
from typing import Iterator

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from testkit.servers import ServerProcess, served
from testkit.until import until

pytestmark = pytest.mark.model

KEY = "sk-lifecycle"
SMOL, GEMMA, MINILM = "smol", "gemma", "minilm"
SHAPE = "context = 2048\nparallel = 2\nbatch = 64\nthreads = 1\nprefix_cache_mib = 0\n"   # room for long streams
EMBED_SHAPE = "context = 256\nparallel = 2\nbatch = 64\nthreads = 1\n"
BUDGET = 680
CONFIG = f"""\
[server]
api_keys = ["{KEY}"]
memory_budget_mib = {BUDGET}
load_timeout = 120

[[endpoints]]
name = "{SMOL}"
model = "smollm2-135m"
load = "on_demand"
{SHAPE}
[[endpoints]]
name = "{GEMMA}"
model = "gemma3-270m"
load = "on_demand"
{SHAPE}
[[endpoints]]
name = "{MINILM}"
model = "minilm-l6-v2"
load = "on_demand"
{EMBED_SHAPE}"""
# end-of-generation tokens banned so that a stream runs to max_tokens (smollm2: <|endoftext|>,
# <|im_start|>, <|im_end|>; gemma3: <eos>, <end_of_turn>)
SAMPLED = {"prompt": "Write a word:", "max_tokens": 12, "temperature": 0.9, "seed": 11, "logprobs": 2}
BEFORE: dict[str, list] = {}        # smol's answer to SAMPLED before it was evicted
NO_EOS = {SMOL: {"0": -100, "1": -100, "2": -100}, GEMMA: {"1": -100, "106": -100}}


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    with served(tmp_path_factory.mktemp("lifecycle"), CONFIG, key=KEY) as srv:
        yield srv


@pytest.fixture(scope="module")
def http(server: ServerProcess) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=server.base, headers={"Authorization": f"Bearer {KEY}"}, timeout=180,
                      trust_env=False) as c:
        yield c


def endpoints(http: httpx.Client) -> dict[str, dict]:
    r = http.get("/api/v1/endpoints")
    assert r.status_code == 200, r.text
    return {e["name"]: e for e in r.json()["endpoints"]}


def loaded(http: httpx.Client) -> set[str]:
    return {name for name, e in endpoints(http).items() if e["loaded"]}


def counter(http: httpx.Client, name: str, endpoint: str) -> float:
    text = http.get("/metrics").text
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == name and sample.labels.get("endpoint") == endpoint:
                return sample.value
    raise AssertionError(f"{name}{{endpoint={endpoint!r}}} is not in /metrics")


def complete(http: httpx.Client, model: str, max_tokens: int = 4) -> httpx.Response:
    return http.post("/v1/completions", json={"model": model, "prompt": "The capital of France is",
                                              "max_tokens": max_tokens, "temperature": 0})


def complete_sampled(http: httpx.Client) -> httpx.Response:
    return http.post("/v1/completions", json={"model": SMOL, **SAMPLED})


def embed(http: httpx.Client) -> httpx.Response:
    return http.post("/v1/embeddings", json={"model": MINILM, "input": "hello"})


class Stream:
    """A completion streamed in a thread until max_tokens (EOS banned): holds its endpoint busy."""

    def __init__(self, server: ServerProcess, model: str, max_tokens: int = 2000) -> None:
        self.started, self.chunks, self.status = threading.Event(), 0, None
        self.stop = threading.Event()
        body = {"model": model, "prompt": "Once upon a time", "max_tokens": max_tokens, "stream": True,
                "temperature": 0, "logit_bias": NO_EOS[model]}
        self.thread = threading.Thread(target=self._run, args=(server, body), daemon=True)
        self.thread.start()
        assert self.started.wait(180), "the stream never started"
        assert self.status == 200, f"the stream on {model} answered {self.status}"

    def _run(self, server: ServerProcess, body: dict) -> None:
        with httpx.Client(timeout=180, trust_env=False) as c, c.stream(
                "POST", server.base + "/v1/completions", json=body,
                headers={"Authorization": f"Bearer {KEY}"}) as r:
            self.status = r.status_code
            for line in r.iter_lines():
                if line.startswith("data: {"):
                    self.chunks += 1
                    self.started.set()
                if self.stop.is_set():
                    break           # leaving cancels the request (the client went away)
            self.started.set()

    def close(self) -> None:
        self.stop.set()
        self.thread.join(60)


def test_nothing_is_loaded_at_start_and_the_server_is_ready(server, http):
    assert loaded(http) == set()
    assert http.get("/ready").status_code == 200        # on-demand endpoints serve: they load when asked
    eps = endpoints(http)
    assert {e["state"] for e in eps.values()} == {"unloaded"}
    assert all(e["ready"] and e["load"] == "on_demand" for e in eps.values())


def test_concurrent_first_requests_share_one_load(http):
    with concurrent.futures.ThreadPoolExecutor(4) as pool:
        answers = list(pool.map(lambda _: complete(http, SMOL), range(4)))
    assert [r.status_code for r in answers] == [200] * 4, [r.text for r in answers]
    assert len({r.json()["choices"][0]["text"] for r in answers}) == 1
    assert counter(http, "modelyard_endpoint_loads_total", SMOL) == 1
    smol = endpoints(http)[SMOL]
    assert smol["loaded"] and smol["state"] == "ready" and smol["pending"] == 0
    # what llama.cpp allocated, against the GGUF's estimate made before the load
    assert 0 < smol["resident_mib"] <= smol["need_mib"] * 1.1
    r = complete_sampled(http)
    assert r.status_code == 200, r.text
    BEFORE[SMOL] = r.json()["choices"]
    assert smol["last_used"] is not None and smol["expires_at"] is None       # keep_alive -1: never


def test_the_least_recently_used_idle_endpoint_is_evicted(http):
    assert embed(http).status_code == 200
    assert loaded(http) == {SMOL, MINILM}
    assert complete(http, GEMMA).status_code == 200       # smol + minilm + gemma > budget: smol goes
    assert loaded(http) == {MINILM, GEMMA}
    assert counter(http, "modelyard_endpoint_evictions_total", SMOL) == 1
    assert counter(http, "modelyard_endpoint_evictions_total", MINILM) == 0
    assert sum(e["resident_mib"] or 0 for e in endpoints(http).values()) <= BUDGET


def test_a_busy_endpoint_keeps_its_model_and_the_next_idle_one_goes(server, http):
    assert embed(http).status_code == 200       # minilm is now used after gemma: gemma is the LRU
    stream = Stream(server, GEMMA)
    try:
        assert complete(http, SMOL).status_code == 200      # needs room: gemma is busy, minilm is not
        assert loaded(http) == {GEMMA, SMOL}
        assert counter(http, "modelyard_endpoint_evictions_total", GEMMA) == 0
        assert counter(http, "modelyard_endpoint_evictions_total", MINILM) == 1
        assert stream.status == 200 and not stream.stop.is_set()
        # smol was evicted and loaded again: the same request gives the same bits
        again = complete_sampled(http)
        assert again.status_code == 200 and again.json()["choices"] == BEFORE[SMOL]
        assert counter(http, "modelyard_endpoint_loads_total", SMOL) == 2
        before = stream.chunks
        until(lambda: stream.chunks > before, 60, "the stream on gemma going on after the eviction")
    finally:
        stream.close()


def test_503_when_nothing_can_be_evicted(server, http):
    streams = [Stream(server, GEMMA), Stream(server, SMOL)]
    try:
        r = embed(http)
        assert r.status_code == 503, r.text
        assert float(r.headers["retry-after"]) > 0
        error = r.json()["error"]
        assert error["code"] == "memory_budget_exceeded"
        for words in (f"memory_budget_mib = {BUDGET}", "'gemma'", "'smol'", "busy", f"{MINILM!r} needs"):
            assert words in error["message"], error["message"]
        assert loaded(http) == {GEMMA, SMOL}
        assert endpoints(http)[MINILM]["ready"]          # still served: the next request tries again
    finally:
        for s in streams:
            s.close()
    # once idle, the same request evicts one of them and is served
    until(lambda: all(e["pending"] == 0 for e in endpoints(http).values()), 60, "the streams' ends")
    assert embed(http).status_code == 200
    assert MINILM in loaded(http)
