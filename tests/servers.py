"""Servers for the tests that talk HTTP: `modelyard serve` (or another server, such as
llama-cpp-python's) as a subprocess on a free loopback port, with a TOML config and a log file of
its own, waited for until it is ready and stopped by its PID (SIGTERM, then SIGKILL).

Import it as `from servers import ...` (tests/ is on sys.path, as tests/conftest.py's folder).
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator

import httpx

MODEL = "smollm2-135m"
OPENAI_PREFIX = "/api/v1/compatibility/openai/v1"
START_TIMEOUT = 120.0
IDLE = ("in_flight", "slots_used")       # an endpoint is idle when these are all 0


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def bearer(key: str | None) -> dict:
    return {"Authorization": f"Bearer {key}"} if key else {}


class ServerAPI:
    """What the tests ask of a running modelyard server at `base` (in a subprocess or in process),
    with the API key `key`, about its endpoint `model`."""

    base: str
    key: str | None
    model: str

    @property
    def api(self) -> str:
        return self.base + OPENAI_PREFIX

    @property
    def headers(self) -> dict:
        return bearer(self.key)

    def endpoint(self, key: str | None = None) -> dict:
        """GET /api/v1/endpoints/<model>: the endpoint's description."""
        r = httpx.get(f"{self.base}/api/v1/endpoints/{self.model}", headers=bearer(key or self.key), timeout=10)
        assert r.status_code == 200, r.text
        return r.json()

    def wait_idle(self, timeout: float = 15.0, key: str | None = None, fields: tuple[str, ...] = IDLE) -> dict:
        """The endpoint's description once `fields` are all 0 (nothing in flight, no slot in use),
        or as it is at `timeout`."""
        deadline = time.monotonic() + timeout
        while True:
            ep = self.endpoint(key)
            if all(ep.get(f) == 0 for f in fields) or time.monotonic() > deadline:
                return ep
            time.sleep(0.1)


@dataclass
class ServerProcess(ServerAPI):
    """A server subprocess listening on 127.0.0.1:`port`, its output in `log`; `start` runs `argv`."""

    argv: list[str]
    port: int
    log: Path
    key: str | None = None
    model: str = MODEL
    proc: subprocess.Popen | None = None
    env: dict[str, str] | None = None          # added to the process's environment

    @property
    def base(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self, log: Path | None = None) -> "ServerProcess":
        """Start the process (again, after a stop or kill), logging to `log` if given."""
        self.log = log or self.log
        env = {k: v for k, v in os.environ.items() if k != "MODELYARD_API_KEYS"}
        env.update(self.env or {})
        env["PYTHONUNBUFFERED"] = "1"
        with open(self.log, "wb") as out:
            self.proc = subprocess.Popen(self.argv, stdout=out, stderr=subprocess.STDOUT,
                                         stdin=subprocess.DEVNULL, env=env)
        return self

    def exited(self) -> bool:
        return self.proc is not None and self.proc.poll() is not None

    def signal(self, sig: int) -> None:
        assert self.proc is not None
        os.kill(self.proc.pid, sig)

    def kill(self) -> None:
        """SIGKILL by PID: the process vanishes like a crashed machine, without draining."""
        assert self.proc is not None and self.proc.poll() is None
        self.proc.kill()
        self.proc.wait(timeout=10)

    def stop(self, timeout: float = 15.0) -> int | None:
        """SIGTERM, then SIGKILL after `timeout`; the exit code (None if never started)."""
        if self.proc is None:
            return None
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=10)
        return self.proc.returncode

    def log_text(self) -> str:
        try:
            return self.log.read_text(errors="replace")
        except OSError:
            return ""

    def log_tail(self, lines: int = 60) -> str:
        return "\n".join(self.log_text().splitlines()[-lines:]) or "(no log)"


def modelyard_process(directory: Path, config: str, *, name: str = "server", key: str | None = None,
              model: str = MODEL) -> ServerProcess:
    """`modelyard serve` with `config` (written to <directory>/<name>.toml) on a free loopback port,
    logging to <directory>/<name>.log; not started yet."""
    directory.mkdir(parents=True, exist_ok=True)
    cfg = directory / f"{name}.toml"
    cfg.write_text(config)
    port = free_port()
    # The control database defaults to <store_dir>/control.db, the user's ~/.cache/modelyard:
    # a test server that names none gets its own beside its config instead, so that nothing a
    # test writes (endpoints, tokens, the console's key, audit rows) outlives the run or reaches
    # the next one (issue 18). The store's model files are still shared: they are only fetched.
    env = None
    if "database_url" not in config and "store_dir" not in config:
        env = {"MODELYARD_DATABASE_URL": f"sqlite:///{directory / f'{name}-control.db'}"}
    return ServerProcess([sys.executable, "-m", "modelyard", "serve", "--config", str(cfg),
                          "--host", "127.0.0.1", "--port", str(port)],
                         port, directory / f"{name}.log", key=key, model=model, env=env)


def wait_for(what: str, check: Callable[[], bool], server: ServerProcess, timeout: float = START_TIMEOUT) -> None:
    """Poll `check` until it holds; a RuntimeError with the server's log if the process exits
    first or `timeout` passes. Connection errors count as "not yet"."""
    deadline = time.monotonic() + timeout
    last = "no answer yet"
    while time.monotonic() < deadline:
        if server.exited():
            assert server.proc is not None
            raise RuntimeError(f"{what}: process exited with {server.proc.returncode}:\n{server.log_tail()}")
        try:
            if check():
                return
        except httpx.TransportError as exc:
            last = repr(exc)
        time.sleep(0.25)
    raise RuntimeError(f"{what}: not within {timeout:.0f}s (last error: {last}):\n{server.log_tail()}")


def status_is(url: str, code: int = 200) -> Callable[[], bool]:
    return lambda: httpx.get(url, timeout=5).status_code == code


def wait_ready(server: ServerProcess, what: str = "ready", endpoints: tuple[str, ...] | None = None,
               timeout: float = START_TIMEOUT) -> None:
    """Until /ready (it needs no key) says every endpoint, or each of `endpoints`, can serve; a
    RuntimeError at once if one of those failed to load."""
    def check() -> bool:
        r = httpx.get(server.base + "/ready", timeout=5)
        if r.status_code == 200:
            return True
        if r.status_code != 503:
            return False
        waiting = {name: why for name, why in r.json().get("not_ready", {}).items()
                   if endpoints is None or name in endpoints}
        failed = {name: why for name, why in waiting.items() if str(why).startswith("failed")}
        if failed:
            raise RuntimeError(f"{what}: endpoint failed: {failed}\n{server.log_tail()}")
        return not waiting

    wait_for(what, check, server, timeout)


def serve(directory: Path, config: str, *, name: str = "server", key: str | None = None,
          endpoints: tuple[str, ...] | None = None) -> ServerProcess:
    """`modelyard serve` with `config`, started; returns once ready (see `wait_ready`)."""
    srv = modelyard_process(directory, config, name=name, key=key).start()
    try:
        wait_ready(srv, f"{name} ready", endpoints)
    except BaseException:
        srv.stop(timeout=5)
        raise
    return srv


@contextmanager
def served(directory: Path, config: str, *, name: str = "server", key: str | None = None,
           endpoints: tuple[str, ...] | None = None,
           show_log: Callable[[], bool] = lambda: False) -> Iterator[ServerProcess]:
    """`serve`, stopped on leaving; prints its log's tail if it exited abnormally or `show_log()`."""
    srv = serve(directory, config, name=name, key=key, endpoints=endpoints)
    try:
        yield srv
    finally:
        code = srv.stop()
        if code not in (0, -signal.SIGTERM) or show_log():
            print(f"\n--- modelyard {name} log (exit {code}) ---\n{srv.log_tail()}")


def side_by_side_config(key: str, upstream_api: str, upstream_key: str | None = None) -> str:
    """A gateway serving smollm2-135m and gemma3-270m embedded (small, 1 thread) beside
    "remote-smol", an openai-engine endpoint on `upstream_api` serving smollm2-135m."""
    engine = "context = 512\nparallel = 2\nthreads = 1\n"
    auth = f'api_key = "{upstream_key}"\n' if upstream_key else ""
    return f"""\
[server]
api_keys = ["{key}"]
log_level = "info"

[[endpoints]]
name = "smollm2-135m"
model = "smollm2-135m"
{engine}
[[endpoints]]
name = "gemma3-270m"
model = "gemma3-270m"
{engine}
[[endpoints]]
name = "remote-smol"
engine = "openai"
urls = ["{upstream_api}"]
upstream_model = "smollm2-135m"
{auth}"""
