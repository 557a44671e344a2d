"""Small helpers every benchmark script shares (run as `python bench/X.py`, so `bench/` is on
sys.path and `from common import ...` works)."""

from __future__ import annotations

import os
import platform
import signal
import socket
import statistics
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path

import httpx


def free_port() -> int:
    """A free port on loopback (benchmarks never listen beyond it)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def median_spread(xs: list[float | None]) -> tuple[float | None, float | None, float | None]:
    """(median, min, max) of the measured values; None where nothing was measured."""
    xs = [x for x in xs if x is not None]
    if not xs:
        return None, None, None
    return statistics.median(xs), min(xs), max(xs)


def ratio(a: float | None, b: float | None) -> float | None:
    return a / b if a is not None and b else None


@dataclass
class ServerProc:
    """A server the benchmark starts on loopback, waits for, and stops by PID (with anything
    it forked: it runs in its own process group)."""

    name: str
    argv: list[str]
    port: int
    ready_path: str
    env: dict[str, str | None] = field(default_factory=dict)   # None: unset
    config_text: str | None = None
    proc: subprocess.Popen | None = None
    log_path: Path | None = None

    @property
    def base(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def start(self, workdir: Path, timeout: float = 120.0) -> float:
        self.log_path = workdir / f"{self.name}.{int(time.time() * 1000)}.log"
        env = {k: v for k, v in os.environ.items() if not k.startswith("MODELYARD_")}
        for k, v in self.env.items():
            if v is None:
                env.pop(k, None)
            else:
                env[k] = v
        t0 = time.perf_counter()
        with open(self.log_path, "wb") as log:
            # its own session: a gateway that forks workers is stopped as one group (by our PID)
            self.proc = subprocess.Popen(self.argv, stdout=log, stderr=subprocess.STDOUT, env=env,
                                         stdin=subprocess.DEVNULL, cwd=workdir, start_new_session=True)
        deadline = t0 + timeout
        with httpx.Client(timeout=2.0, trust_env=False) as c:
            while time.perf_counter() < deadline:
                if self.proc.poll() is not None:
                    raise RuntimeError(f"{self.name} exited with {self.proc.returncode} while starting; "
                                       f"log {self.log_path}:\n{self.tail()}")
                try:
                    if c.get(self.base + self.ready_path).status_code == 200:
                        return time.perf_counter() - t0
                except httpx.HTTPError:
                    pass
                time.sleep(0.25)
        self.stop()
        raise RuntimeError(f"{self.name} not ready after {timeout:.0f}s; log {self.log_path}:\n{self.tail()}")

    def stop(self) -> None:
        proc, self.proc = self.proc, None
        if proc is None:
            return
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(timeout=10)
        try:   # anything it forked (same process group, whose id is its PID) goes with it
            os.killpg(proc.pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass

    def tail(self, n: int = 25) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-n:])  # type: ignore[union-attr]
        except (OSError, AttributeError):
            return ""


def cpu_model() -> str:
    """The CPU's model name, recorded beside every figure."""
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, timeout=10).stdout
        for line in out.splitlines():
            if line.startswith("Model name:"):
                return line.split(":", 1)[1].strip()
    except (OSError, subprocess.SubprocessError):
        pass
    return platform.processor() or "unknown"
