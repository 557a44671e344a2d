"""Helpers for the reliability tests: a `modelyard serve` subprocess with a config of the test's
own (small queue, quotas, short grace period...), SSE reading and error-body checks.

Every server listens on loopback, logs to a file of its own, and is stopped by its PID.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import httpx

MODEL = "smollm2-135m"
KEY = "test-key"
OPENAI_PREFIX = "/api/v1/compatibility/openai/v1"
START_TIMEOUT = 120.0


def config(*, parallel: int = 2, context: int = 256, max_queue: int = 4, batch: int = 64,
           api_keys: tuple[str, ...] = (KEY,), server: str = "", extra: str = "") -> str:
    """A TOML config with one endpoint (the default model, one thread: the machine is shared) and whatever `server`
    lines and `extra` tables ([limits], [[keys]]) the test adds."""
    keys = ", ".join(json.dumps(k) for k in api_keys)
    return (f"[server]\napi_keys = [{keys}]\nlog_level = \"info\"\n{server}\n"
            f"[[endpoints]]\nname = \"{MODEL}\"\nmodel = \"{MODEL}\"\ncontext = {context}\n"
            f"parallel = {parallel}\nmax_queue = {max_queue}\nbatch = {batch}\nthreads = 1\n\n{extra}\n")


@dataclass
class LiveServer:
    base: str
    log: Path
    proc: subprocess.Popen
    key: str | None = KEY
    model: str = MODEL

    @property
    def api(self) -> str:
        return self.base + OPENAI_PREFIX

    @property
    def headers(self) -> dict:
        return {"Authorization": f"Bearer {self.key}"} if self.key else {}

    def log_text(self) -> str:
        try:
            return self.log.read_text(errors="replace")
        except OSError:
            return ""

    def log_tail(self, lines: int = 60) -> str:
        return "\n".join(self.log_text().splitlines()[-lines:]) or "(no log)"

    def endpoint(self, key: str | None = None) -> dict:
        headers = {"Authorization": f"Bearer {key or self.key}"}
        r = httpx.get(f"{self.base}/api/v1/endpoints/{self.model}", headers=headers, timeout=10)
        assert r.status_code == 200, r.text
        return r.json()

    def wait_idle(self, timeout: float = 15.0, key: str | None = None) -> dict:
        """The endpoint's description once nothing is in flight and no slot is in use."""
        deadline = time.monotonic() + timeout
        while True:
            ep = self.endpoint(key)
            if ep.get("in_flight") == 0 and ep.get("slots_used") == 0:
                return ep
            if time.monotonic() > deadline:
                return ep
            time.sleep(0.1)

    def signal(self, sig: int) -> None:
        os.kill(self.proc.pid, sig)

    def stop(self, timeout: float = 15.0) -> int:
        """SIGTERM, then SIGKILL after `timeout`; the exit code."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=10)
        return self.proc.returncode


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(directory: Path, cfg: str, *, key: str | None = KEY) -> LiveServer:
    """Start `modelyard serve` with this config and wait until /ready says so (it needs no key,
    so waiting spends no quota)."""
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / "modelyard.toml"
    path.write_text(cfg)
    log = directory / "server.log"
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("MODELYARD_")}
    with open(log, "wb") as out:
        proc = subprocess.Popen([sys.executable, "-m", "modelyard", "serve", "--config", str(path),
                                 "--host", "127.0.0.1", "--port", str(port)],
                                stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=env)
    srv = LiveServer(base=f"http://127.0.0.1:{port}", log=log, proc=proc, key=key)
    try:
        _wait_ready(srv)
    except BaseException:
        srv.stop(timeout=5)
        raise
    return srv


def _wait_ready(srv: LiveServer) -> None:
    deadline = time.monotonic() + START_TIMEOUT
    last = "no answer yet"
    with httpx.Client(base_url=srv.base, timeout=5) as c:
        while time.monotonic() < deadline:
            if srv.proc.poll() is not None:
                raise RuntimeError(f"server exited with {srv.proc.returncode}:\n{srv.log_tail()}")
            try:
                r = c.get("/ready")
                last = f"{r.status_code} {r.text[:300]}"
                if r.status_code == 200:
                    return
                if "failed" in r.text:
                    raise RuntimeError(f"endpoint failed: {r.text}\n{srv.log_tail()}")
            except httpx.TransportError as exc:
                last = repr(exc)
            time.sleep(0.2)
    raise RuntimeError(f"server not ready after {START_TIMEOUT}s (last: {last}):\n{srv.log_tail()}")


@contextmanager
def live_server(directory: Path, cfg: str, *, key: str | None = KEY) -> Iterator[LiveServer]:
    srv = start_server(directory, cfg, key=key)
    try:
        yield srv
    finally:
        code = srv.stop()
        if code not in (0, -signal.SIGTERM):
            print(f"\n--- modelyard server log (exit {code}) ---\n{srv.log_tail()}")


# -- bodies -------------------------------------------------------------------------------

def assert_openai_error(body: object, type_: str | None = None) -> dict:
    """`{"error": {"message", "type", "param", "code"}}` with a non-empty message; the error."""
    assert isinstance(body, dict) and set(body) == {"error"}, body
    err = body["error"]
    assert isinstance(err, dict) and set(err) == {"message", "type", "param", "code"}, body
    assert isinstance(err["message"], str) and err["message"], body
    assert isinstance(err["type"], str) and err["type"], body
    assert err["param"] is None or isinstance(err["param"], str), body
    assert err["code"] is None or isinstance(err["code"], str), body
    if type_ is not None:
        assert err["type"] == type_, body
    return err


def assert_validation_error(body: object) -> list:
    """FastAPI's `{"detail": [{"loc", "msg", "type", ...}]}`; the details."""
    assert isinstance(body, dict) and "detail" in body, body
    detail = body["detail"]
    assert isinstance(detail, list) and detail, body
    for d in detail:
        assert isinstance(d, dict) and {"loc", "msg", "type"} <= set(d), body
        assert isinstance(d["loc"], list) and isinstance(d["msg"], str) and isinstance(d["type"], str), body
    return detail


def sse_events(lines: Iterator[str]) -> list[object]:
    """The `data:` payloads of an SSE stream: JSON objects, and the string "[DONE]"."""
    events: list[object] = []
    for line in lines:
        if not line.startswith("data:"):
            continue
        data = line[5:].strip()
        events.append(data if data == "[DONE]" else json.loads(data))
    return events


def check_stream_end(events: list[object]) -> str:
    """A stream must end with [DONE] after either a finish_reason chunk per choice or an error
    event; returns "finished" or "error" (never a silent cut)."""
    assert events and events[-1] == "[DONE]", f"stream not ended by [DONE]: {events[-3:]}"
    assert events.count("[DONE]") == 1, events
    body = [e for e in events[:-1]]
    if body and isinstance(body[-1], dict) and "error" in body[-1]:
        assert_openai_error(body[-1])
        return "error"
    finished = [c for e in body if isinstance(e, dict)
                for c in e.get("choices", []) if c.get("finish_reason")]
    assert finished, f"stream ended without a finish_reason or an error event: {events[-3:]}"
    return "finished"
