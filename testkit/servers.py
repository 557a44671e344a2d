"""The one harness for servers the tests and the benchmarks run as subprocesses: `modelyard serve`
(or another server, such as llama-server or llama-cpp-python's) on a loopback port, with a TOML
config and a log file of its own, waited for until it is ready and stopped by its PID.

What it guarantees, and why:
- its environment has none of the caller's `MODELYARD_*` settings (only `MODELYARD_HOME`, where
  the model files are, and what the caller passes in `env`): a developer's shell or a CI job
  exporting, say, MODELYARD_API_KEYS or MODELYARD_DATABASE_URL would otherwise change every
  server under test or benchmark; nor any GGML_* switch (an in-process test's kernel choice,
  local/ffi.choose_kernels, must not become the server's);
- a `modelyard serve` runs this checkout's source (src/ first on PYTHONPATH), whatever the
  virtual environment's editable install points at;
- unless its config names a control database, each modelyard server gets its own beside its
  config, never the user's ~/.cache/modelyard/control.db: nothing a test or benchmark writes
  (endpoints, tokens, the console's key, audit rows) outlives it or reaches the next (issue 18);
- it runs in its own process group, and stopping it ends the group: anything it forked goes
  with it (a gateway with workers), and a Ctrl-C meant for pytest does not reach it first.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator

import httpx

from testkit.until import until

ROOT = Path(__file__).resolve().parent.parent
MODEL = "smollm2-135m"
OPENAI_PREFIX = "/api/v1/compatibility/openai/v1"
START_TIMEOUT = 120.0
IDLE = ("in_flight", "slots_used")       # an endpoint is idle when these are all 0
KEEP_ENV = ("MODELYARD_HOME",)           # the model store: shared, its files are only fetched


def free_port() -> int:
    """A free port on loopback (nothing here listens beyond it)."""
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
        or as it is at `timeout` (the caller asserts on what it needs)."""
        last: dict = {}

        def idle() -> bool:
            last.update(self.endpoint(key))
            return all(last.get(f) == 0 for f in fields)
        try:
            until(idle, timeout, "idle")
        except AssertionError:
            pass
        return last


def scrubbed_env(extra: dict[str, str | None] | None = None) -> dict[str, str]:
    """This process's environment without its MODELYARD_* settings (KEEP_ENV kept) and ggml's
    switches (GGML_*: an in-process test's local/ffi.choose_kernels sets GGML_CPU_TILED_MM here, and
    a server chooses its own kernels), then `extra` (a None value unsets that variable)."""
    env = {k: v for k, v in os.environ.items()
           if not (k.startswith("MODELYARD_") and k not in KEEP_ENV or k.startswith("GGML_"))}
    for k, v in (extra or {}).items():
        if v is None:
            env.pop(k, None)
        else:
            env[k] = v
    return env


@dataclass
class ServerProcess(ServerAPI):
    """A server subprocess listening on 127.0.0.1:`port`, its output in `log`; `start` runs `argv`
    (in `cwd`, if given) and `ready_path` answering 200 is what ready means for servers other than
    modelyard (see `wait_ready`)."""

    argv: list[str]
    port: int
    log: Path
    key: str | None = None
    model: str = MODEL
    proc: subprocess.Popen | None = None
    env: dict[str, str | None] | None = None    # on top of the scrubbed environment; None: unset
    name: str = "server"
    ready_path: str = "/ready"
    config_text: str | None = None              # what a report records beside its figures
    cwd: Path | None = None
    stop_timeout: float = 15.0                  # SIGTERM, then this long before SIGKILL
    exit_code: int | None = None                # after stop(): the exit status (negative: the signal)
    stop_seconds: float | None = None           # after stop(): how long it took to exit
    _group_alive: bool = field(default=False, init=False, repr=False)   # its group not yet killed since start

    @property
    def base(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    @property
    def command(self) -> str:
        return " ".join(self.argv)

    def start(self, log: Path | None = None) -> "ServerProcess":
        """Start the process (again, after a stop or kill), logging to `log` if given."""
        self.log = log or self.log
        env = scrubbed_env(self.env)
        env["PYTHONUNBUFFERED"] = "1"
        self.exit_code = self.stop_seconds = None
        with open(self.log, "wb") as out:
            # its own session, so its own process group (whose id is its PID): stop() ends it
            self.proc = subprocess.Popen(self.argv, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                         env=env, cwd=self.cwd, start_new_session=True)
        self._group_alive = True
        return self

    def exited(self) -> bool:
        return self.proc is not None and self.proc.poll() is not None

    def signal(self, sig: int) -> None:
        """`sig` to the server process itself (not its group)."""
        assert self.proc is not None
        os.kill(self.proc.pid, sig)

    def kill(self) -> None:
        """SIGKILL to its process group: it vanishes like a crashed machine, without draining."""
        assert self.proc is not None and self.proc.poll() is None
        self._kill_group()
        self.proc.wait(timeout=10)

    def stop(self, timeout: float | None = None) -> int | None:
        """SIGTERM, then SIGKILL after `timeout` (default `stop_timeout`), then SIGKILL to whatever
        is left of its process group; the exit code (None if never started)."""
        if self.proc is None:
            return None
        timeout = self.stop_timeout if timeout is None else timeout
        t0 = time.monotonic()
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                print(f"{self.name} did not exit within {timeout:.0f}s of SIGTERM: killed", file=sys.stderr)
                self.proc.kill()
                self.proc.wait(timeout=10)
            self.stop_seconds = time.monotonic() - t0
        self._kill_group()
        self.exit_code = self.proc.returncode
        return self.exit_code

    def _kill_group(self) -> None:
        # once per start: after that the group id may name someone else's group
        if self._group_alive:
            self._group_alive = False
            try:
                os.killpg(self.proc.pid, signal.SIGKILL)     # type: ignore[union-attr]
            except (ProcessLookupError, PermissionError):
                pass

    def log_text(self) -> str:
        try:
            return self.log.read_text(errors="replace")
        except OSError:
            return ""

    def log_lines(self) -> list[str]:
        return self.log_text().splitlines()

    def log_tail(self, lines: int = 60) -> str:
        return "\n".join(self.log_lines()[-lines:]) or "(no log)"


def modelyard_process(directory: Path, config: str, *, name: str = "server", key: str | None = None,
                      model: str = MODEL, port: int | None = None,
                      env: dict[str, str | None] | None = None) -> ServerProcess:
    """`modelyard serve` (this checkout's src/) with `config` (written to <directory>/<name>.toml)
    on `port` (default: a free one) of loopback, logging to <directory>/<name>.log; not started yet.
    `env` is added to its environment."""
    directory.mkdir(parents=True, exist_ok=True)
    cfg = directory / f"{name}.toml"
    cfg.write_text(config)
    port = port or free_port()
    path = os.pathsep.join(p for p in (str(ROOT / "src"), os.environ.get("PYTHONPATH")) if p)
    full_env: dict[str, str | None] = {"PYTHONPATH": path}
    # The control database defaults to <store_dir>/control.db, the user's ~/.cache/modelyard:
    # a server that names none gets its own beside its config instead (see the docstring above).
    # The store's model files are still shared: they are only fetched.
    if "database_url" not in config and "store_dir" not in config:
        full_env["MODELYARD_DATABASE_URL"] = f"sqlite:///{directory / f'{name}-control.db'}"
    full_env.update(env or {})
    return ServerProcess([sys.executable, "-m", "modelyard", "serve", "--config", str(cfg),
                          "--host", "127.0.0.1", "--port", str(port)],
                         port, directory / f"{name}.log", key=key, model=model, env=full_env, name=name,
                         config_text=config)


def wait_for(what: str, check: Callable[[], bool], server: ServerProcess, timeout: float = START_TIMEOUT) -> None:
    """Poll `check` until it holds; a RuntimeError with the server's log if the process exits
    first or `timeout` passes. Connection errors count as "not yet"."""
    def alive_and_check() -> bool:
        if server.exited():
            assert server.proc is not None
            raise RuntimeError(f"{what}: process exited with {server.proc.returncode}:\n{server.log_tail()}")
        return check()
    try:
        until(alive_and_check, timeout, what, interval=0.25, retry_on=(httpx.TransportError,))
    except AssertionError as exc:
        raise RuntimeError(f"{exc}:\n{server.log_tail()}") from None


def status_is(url: str, code: int = 200) -> Callable[[], bool]:
    return lambda: httpx.get(url, timeout=5, trust_env=False).status_code == code


def wait_ready(server: ServerProcess, what: str = "ready", endpoints: tuple[str, ...] | None = None,
               timeout: float = START_TIMEOUT) -> None:
    """Until `server.ready_path` answers 200; for modelyard's /ready (it needs no key), until it
    says every endpoint, or each of `endpoints`, can serve, and a RuntimeError at once if one of
    those failed to load."""
    def check() -> bool:
        r = httpx.get(server.base + server.ready_path, timeout=5, trust_env=False)
        if r.status_code == 200:
            return True
        try:
            not_ready = r.json().get("not_ready") if r.status_code == 503 else None
        except (ValueError, AttributeError):
            not_ready = None
        if not isinstance(not_ready, dict):          # not modelyard's /ready: not yet
            return False
        waiting = {name: why for name, why in not_ready.items() if endpoints is None or name in endpoints}
        failed = {name: why for name, why in waiting.items() if str(why).startswith("failed")}
        if failed:
            raise RuntimeError(f"{what}: endpoint failed: {failed}\n{server.log_tail()}")
        return not waiting

    wait_for(what, check, server, timeout)


def start_ready(server: ServerProcess, what: str | None = None, endpoints: tuple[str, ...] | None = None,
                timeout: float = START_TIMEOUT) -> float:
    """Start `server` and wait until it is ready (see `wait_ready`); the seconds that took. If it
    never gets ready it is stopped and the RuntimeError says why, with its log's tail."""
    t0 = time.perf_counter()
    server.start()
    try:
        wait_ready(server, what or f"{server.name} ready", endpoints, timeout)
    except BaseException:
        server.stop(timeout=5)
        raise
    return time.perf_counter() - t0


def serve(directory: Path, config: str, *, name: str = "server", key: str | None = None,
          endpoints: tuple[str, ...] | None = None) -> ServerProcess:
    """`modelyard serve` with `config`, started; returns once ready (see `wait_ready`)."""
    srv = modelyard_process(directory, config, name=name, key=key)
    start_ready(srv, f"{name} ready", endpoints)
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
