"""Shared fixtures: one real `modelyard serve` subprocess for the whole session.

The server serves two endpoints: `smollm2-135m` (the default model, small context so that
overflow is cheap to provoke) and `broken` (a model file that does not exist, so the endpoint
fails at load and stays failed). Tests that use it are marked `model`.
"""

from __future__ import annotations

import os
from typing import Iterator

import httpx
import pytest
from hypothesis import settings as hypothesis_settings

from testkit.servers import MODEL, ServerProcess, served

# No state from an earlier run: Hypothesis's example database (.hypothesis/ in the working
# directory) would replay what a previous run found. In CI the property tests are also
# derandomized, so a landing depends on nothing drawn at random (issue 18); a developer's run
# explores new examples each time, and a failure prints the seed that reproduces it.
hypothesis_settings.register_profile("modelyard", database=None, derandomize=bool(os.environ.get("CI")))
hypothesis_settings.load_profile("modelyard")

KEY = "test-key"

CONFIG = f"""\
[server]
api_keys = ["{KEY}"]
log_level = "info"
# One tenant: the context and disconnect tests read what a request left in the slots
# (cached_tokens), which servers hide from inference keys unless they opt in.
public_cache_counters = true

[[endpoints]]
name = "{MODEL}"
model = "{MODEL}"
context = 512
parallel = 4
batch = 128
# One thread: on this shared 2-core machine, threads = 2 competes with other processes and
# ggml's spinning barriers make each token 15-25x slower (4-6 s vs 0.25 s per 16 tokens).
threads = 1

[[endpoints]]
name = "broken"
model = "/nonexistent/x.gguf"
"""


@pytest.fixture(scope="session")
def server(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    # Ready once MODEL is: "broken" fails at load, so /ready as a whole never says 200.
    with served(tmp_path_factory.mktemp("server"), CONFIG, key=KEY, endpoints=(MODEL,),
                show_log=lambda: bool(request.session.testsfailed)) as srv:
        yield srv


@pytest.fixture(scope="session")
def client(server: ServerProcess) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=server.api, headers=server.headers, timeout=60) as c:
        yield c


@pytest.hookimpl(hookwrapper=True, tryfirst=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo):
    """Print the server log's tail under any failing test that used the server."""
    outcome = yield
    report = outcome.get_result()
    if report.failed and "server" in getattr(item, "fixturenames", ()):
        srv = getattr(item, "funcargs", {}).get("server")
        if isinstance(srv, ServerProcess):
            report.sections.append(("modelyard server log (tail)", srv.log_tail(40)))
