"""Shared fixtures: one real `modelyard serve` subprocess for the whole session.

The server serves two endpoints: `smollm2-135m` (the default model, small context so that
overflow is cheap to provoke) and `broken` (a model file that does not exist, so the endpoint
fails at load and stays failed). Tests that use it are marked `model`.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

import httpx
import pytest

KEY = "test-key"
MODEL = "smollm2-135m"
OPENAI_PREFIX = "/api/v1/compatibility/openai/v1"
START_TIMEOUT = 120.0

CONFIG = f"""\
[server]
api_keys = ["{KEY}"]
log_level = "info"

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


@dataclass
class Server:
    base: str
    key: str
    log: Path
    proc: subprocess.Popen
    model: str = MODEL
    headers: dict = field(default_factory=dict)

    @property
    def api(self) -> str:
        return self.base + OPENAI_PREFIX

    def log_tail(self, lines: int = 60) -> str:
        try:
            return "\n".join(self.log.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return "(no log)"


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait_ready(srv: Server) -> None:
    deadline = time.monotonic() + START_TIMEOUT
    last = "no answer yet"
    with httpx.Client(base_url=srv.base, headers=srv.headers, timeout=5) as c:
        while time.monotonic() < deadline:
            if srv.proc.poll() is not None:
                raise RuntimeError(f"server exited with {srv.proc.returncode}:\n{srv.log_tail()}")
            try:
                r = c.get(f"/api/v1/endpoints/{MODEL}")
                last = f"{r.status_code} {r.text[:300]}"
                if r.status_code == 200:
                    body = r.json()
                    if body.get("state") == "ready":
                        return
                    if body.get("state") == "failed":
                        raise RuntimeError(f"endpoint {MODEL} failed: {body}\n{srv.log_tail()}")
            except httpx.TransportError as exc:
                last = repr(exc)
            time.sleep(0.25)
    raise RuntimeError(f"server not ready after {START_TIMEOUT}s (last: {last}):\n{srv.log_tail()}")


def _stop(proc: subprocess.Popen) -> None:
    if proc.poll() is not None:
        return
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(timeout=10)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(timeout=10)


@pytest.fixture(scope="session")
def server(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    tmp = tmp_path_factory.mktemp("server")
    cfg = tmp / "modelyard.toml"
    cfg.write_text(CONFIG)
    log = tmp / "server.log"
    port = _free_port()
    env = {k: v for k, v in os.environ.items() if k not in ("MODELYARD_API_KEYS",)}
    with open(log, "wb") as out:
        proc = subprocess.Popen([sys.executable, "-m", "modelyard", "serve", "--config", str(cfg),
                                 "--port", str(port)],
                                stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=env)
    srv = Server(base=f"http://127.0.0.1:{port}", key=KEY, log=log, proc=proc,
                 headers={"Authorization": f"Bearer {KEY}"})
    try:
        _wait_ready(srv)
    except BaseException:
        _stop(proc)
        raise
    yield srv
    _stop(proc)
    if proc.returncode not in (0, -signal.SIGTERM) or request.session.testsfailed:
        print(f"\n--- modelyard server log (exit {proc.returncode}) ---\n{srv.log_tail()}")


@pytest.fixture(scope="session")
def client(server: Server) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=server.api, headers=server.headers, timeout=60) as c:
        yield c


@pytest.hookimpl(hookwrapper=True, tryfirst=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo):
    """Print the server log's tail under any failing test that used the server."""
    outcome = yield
    report = outcome.get_result()
    if report.failed and "server" in getattr(item, "fixturenames", ()):
        srv = getattr(item, "funcargs", {}).get("server")
        if isinstance(srv, Server):
            report.sections.append(("modelyard server log (tail)", srv.log_tail(40)))
