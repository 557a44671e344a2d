"""The embedded engine end to end on the real model: output independent of load, n>1 equal to
separate seeded requests, prefix reuse. Runs against the session server (parallel 4, batch 128)."""

from __future__ import annotations

import random
import threading
import time

import httpx
import pytest

pytestmark = pytest.mark.model

WORDS = ("river stone lantern maple orbit velvet harbor cinder meadow quartz falcon ember willow "
         "glacier tundra copper saffron violet marble thunder").split()


def prompt(i: int, words: int) -> str:
    rng = random.Random(i)
    return f"Story {i}: " + " ".join(rng.choice(WORDS) for _ in range(words)) + ". Then"


# Prompt lengths from a few tokens to ~300: longer than the step budget (128), so their
# prefill is chunked and interleaved with other requests' decodes under load.
CASES = [dict(prompt=prompt(i, w), max_tokens=12, logprobs=2, **sampling)
         for i, w in enumerate((3, 40, 150, 260))
         for sampling in ({"temperature": 0}, {"temperature": 0.9, "seed": 1000 + i})]


def complete(server, body: dict) -> dict:
    r = httpx.post(server.api + "/completions", json={"model": server.model, **body},
                   headers=server.headers, timeout=600)
    assert r.status_code == 200, r.text
    return r.json()["choices"][0]


def fingerprint(choice: dict) -> tuple:
    lp = choice["logprobs"]
    return choice["text"], tuple(lp["tokens"]), tuple(lp["token_logprobs"]), \
        tuple(tuple(sorted(t.items())) for t in lp["top_logprobs"])


def test_output_identical_alone_and_under_staggered_load(server):
    alone = [fingerprint(complete(server, c)) for c in CASES]
    # Twice the cases, in shuffled order, arriving at random times over ~1.5 s: more requests
    # than slots (queueing), chunked prefill beside decodes, and cached prefixes reused.
    order = list(range(len(CASES))) * 2
    rng = random.Random(7)
    rng.shuffle(order)
    results: dict[int, list] = {i: [] for i in range(len(CASES))}
    errors: list[BaseException] = []

    def run(i: int, delay: float) -> None:
        time.sleep(delay)
        try:
            results[i].append(fingerprint(complete(server, CASES[i])))
        except BaseException as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    threads = [threading.Thread(target=run, args=(i, rng.uniform(0, 1.5))) for i in order]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=900)
    assert not errors, errors
    for i, case in enumerate(CASES):
        assert results[i] == [alone[i], alone[i]], f"case {i} ({case['temperature']=}) changed under load"


def test_n_choices_equal_separate_seeded_requests(server):
    body = {"prompt": prompt(99, 20), "max_tokens": 10, "temperature": 1.0, "seed": 42}
    r = httpx.post(server.api + "/completions", json={"model": server.model, "n": 3, **body},
                   headers=server.headers, timeout=600)
    choices = sorted(r.json()["choices"], key=lambda c: c["index"])
    separate = [complete(server, {**body, "seed": 42 + i})["text"] for i in range(3)]
    assert [c["text"] for c in choices] == separate
    assert len(set(separate)) > 1, "seeded choices should differ from each other"


def test_prefix_of_a_finished_request_is_reused(server):
    status = lambda: httpx.get(f"{server.base}/api/v1/endpoints/{server.model}",  # noqa: E731
                               headers=server.headers).json()
    shared = prompt(123, 120)
    first = complete(server, {"prompt": shared + " A", "max_tokens": 2})
    before = status()["prefix_reused_tokens"]
    second = complete(server, {"prompt": shared + " B", "max_tokens": 2})
    reused = status()["prefix_reused_tokens"] - before
    n_shared = len(httpx.post(server.api + "/completions", json={
        "model": server.model, "prompt": shared, "max_tokens": 1, "echo": True, "logprobs": 0},
        headers=server.headers).json()["choices"][0]["logprobs"]["tokens"])
    assert reused >= n_shared - 2, (reused, n_shared)   # the last two prompt tokens are always computed
    assert first["text"] and second["text"]
    idle = status()
    assert idle["slots_used"] == 0 and idle["in_flight"] == 0
