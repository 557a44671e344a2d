"""A remote endpoint under the keep_alive policy (issue 24, proxy/lifecycle), over real HTTP: a
`modelyard serve` process in front of an upstream that sleeps and wakes as vLLM's sleep mode and
llama-server's router mode do (testkit/sleeping_upstream: their documented calls). The upstream is
put to sleep after keep_alive idle and woken by the next request, which is then served; requests
are held while no replica is up, and answered 503 past load_timeout; the metrics an autoscaler
reads count the holding."""

from __future__ import annotations

import threading
from typing import Iterator

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from testkit.servers import ServerProcess, served
from testkit.sleeping_upstream import Sleepy
from testkit.until import until
from testkit.upstream import running


def gateway_config(url: str, dialect: str, keep_alive: float, load_timeout: float = 60) -> str:
    return f"""\
[server]
load_timeout = {load_timeout}

[[endpoints]]
name = "remote"
engine = "openai"
urls = ["{url}/v1"]
upstream_model = "org/model"
upstream_server = "{dialect}"
load = "on_demand"
keep_alive = {keep_alive}
"""


@pytest.fixture(params=["vllm", "llama-server"])
def pair(request, tmp_path) -> Iterator[tuple[Sleepy, ServerProcess]]:
    sleepy = Sleepy(request.param)
    with running(sleepy.app()) as url, served(tmp_path, gateway_config(url, request.param, 1)) as srv:
        yield sleepy, srv


def complete(srv: ServerProcess, timeout: float = 60) -> httpx.Response:
    return httpx.post(srv.base + "/v1/completions", json={"model": "remote", "prompt": "Hi", "max_tokens": 2},
                      timeout=timeout, trust_env=False)


def metric(srv: ServerProcess, name: str) -> float:
    text = httpx.get(srv.base + "/metrics", timeout=10, trust_env=False).text
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == name and sample.labels.get("endpoint") == "remote":
                return sample.value
    raise AssertionError(f"{name} is not in /metrics")


def test_idle_upstream_sleeps_and_the_next_request_wakes_it(pair):
    sleepy, srv = pair
    # idle from the start: after keep_alive (1 s) it is put to sleep
    until(lambda: sleepy.asleep, 30, "the upstream put to sleep after keep_alive idle")
    assert metric(srv, "modelyard_endpoint_loaded") == 0
    loads, unloads = metric(srv, "modelyard_endpoint_loads_total"), metric(srv, "modelyard_endpoint_unloads_total")
    assert sleepy.calls == ["sleep"] and unloads == 1
    r = complete(srv)
    assert r.status_code == 200, r.text
    assert r.json()["choices"][0]["text"] == " awake"
    assert sleepy.calls == ["sleep", "wake", "completion"]         # woken before it was sent the request
    assert metric(srv, "modelyard_endpoint_loads_total") == loads + 1
    until(lambda: sleepy.asleep, 30, "the upstream asleep again after keep_alive idle")
    assert sleepy.calls == ["sleep", "wake", "completion", "sleep"]
    assert metric(srv, "modelyard_endpoint_unloads_total") == unloads + 1


def test_requests_are_held_while_no_replica_is_up(tmp_path):
    sleepy = Sleepy("vllm", up=False)       # scaled to zero: its health probe fails
    with running(sleepy.app()) as url, served(tmp_path, gateway_config(url, "vllm", -1)) as srv:
        answers: list[httpx.Response] = []
        asker = threading.Thread(target=lambda: answers.append(complete(srv)), daemon=True)
        asker.start()
        until(lambda: metric(srv, "modelyard_endpoint_load_waiting") == 1, 30, "the request held")
        assert metric(srv, "modelyard_endpoint_pending") == 1
        sleepy.up = True                     # the replica comes up
        asker.join(60)
        assert [r.status_code for r in answers] == [200]
        assert metric(srv, "modelyard_endpoint_load_waiting") == 0
        assert metric(srv, "modelyard_endpoint_load_wait_seconds_total") > 0


def test_a_replica_that_never_comes_up_is_a_503_after_load_timeout(tmp_path):
    sleepy = Sleepy("vllm", up=False)
    with running(sleepy.app()) as url, served(tmp_path, gateway_config(url, "vllm", -1, load_timeout=1)) as srv:
        r = complete(srv)
        assert r.status_code == 503, r.text
        assert r.json()["error"]["code"] == "upstream_not_up" and "load_timeout" in r.json()["error"]["message"]
        assert float(r.headers["retry-after"]) > 0
        assert sleepy.calls == []


def test_a_requests_keep_alive_counts_on_a_remote_endpoint(tmp_path):
    """Ollama's `keep_alive` in a request body is the policy for a remote endpoint too (as on an
    embedded one: registry/lifecycle): 0 puts the upstream to sleep as soon as the request is
    done, on an endpoint whose own keep_alive is -1 (never); then a long one keeps it awake past
    the endpoint's own keep_alive."""
    sleepy = Sleepy("vllm")
    with running(sleepy.app()) as url, served(tmp_path, gateway_config(url, "vllm", -1)) as srv:
        r = httpx.post(srv.base + "/v1/completions", json={"model": "remote", "prompt": "Hi", "max_tokens": 2,
                                                           "keep_alive": 0}, timeout=60, trust_env=False)
        assert r.status_code == 200, r.text
        until(lambda: sleepy.asleep, 30, "asleep once the request that asked for keep_alive 0 was done")
        assert sleepy.calls[-1] == "sleep" and metric(srv, "modelyard_endpoint_unloads_total") == 1
    sleepy = Sleepy("vllm")
    with running(sleepy.app()) as url, served(tmp_path / "b", gateway_config(url, "vllm", 1)) as srv:
        until(lambda: sleepy.asleep, 30, "asleep after the endpoint's own keep_alive (1 s)")
        r = httpx.post(srv.base + "/v1/completions", json={"model": "remote", "prompt": "Hi", "max_tokens": 2,
                                                           "keep_alive": 3600}, timeout=60, trust_env=False)
        assert r.status_code == 200, r.text
        calls = list(sleepy.calls)
        assert calls[-2:] == ["wake", "completion"]
        # the sweep looks every 0.25 s: 12 looks past the endpoint's 1 s, and it stays awake
        threading.Event().wait(4)
        assert sleepy.calls == calls and not sleepy.asleep
