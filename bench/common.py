"""What every benchmark script shares (run as `python bench/X.py`, so `bench/` is on sys.path and
`from common import ...` works): loopback ports, the one percentile, medians over rounds, the
drivers' skeleton (--json and --rounds, the raw record), the servers (testkit's harness, which the
tests use too), and the one SSE client.

Importing it puts this checkout's src/ and the repository root on sys.path: the scripts measure
this checkout's modelyard, and testkit/ (servers, PostgreSQL, Redis) is shared with the tests
rather than borrowed from tests/ folders."""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import platform
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT / "src"), str(ROOT)]      # modelyard and testkit, from this checkout

from testkit.servers import ServerProcess, free_port, modelyard_process, start_ready  # noqa: E402,F401


def percentile(xs: list[float], q: float) -> float | None:
    """The q-quantile (0 <= q <= 1) by linear interpolation between the two closest ranks: the
    value at fractional position q * (n - 1) of the sorted values (numpy's default, Hyndman and
    Fan's type 7). p50 of an even count is the mean of the middle two; None for no values. The
    one definition every bench script uses, so p50/p95 figures compare across them."""
    if not 0.0 <= q <= 1.0:
        raise ValueError(f"q must be within [0, 1], got {q}")
    xs = sorted(xs)
    if not xs:
        return None
    k = (len(xs) - 1) * q
    lo, hi = math.floor(k), math.ceil(k)
    return xs[lo] + (xs[hi] - xs[lo]) * (k - lo)


def median_spread(xs: list[float | None]) -> tuple[float | None, float | None, float | None]:
    """(median, min, max) of the measured values; None where nothing was measured."""
    xs = [x for x in xs if x is not None]
    if not xs:
        return None, None, None
    return statistics.median(xs), min(xs), max(xs)


def ratio(a: float | None, b: float | None) -> float | None:
    return a / b if a is not None and b else None


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


def cpu_simd_flags() -> str:
    """The vector-extension flags /proc/cpuinfo lists (what llama.cpp's kernels can use)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                keep = ("avx", "fma", "f16c", "bmi2", "amx", "sse4_2")
                return " ".join(f for f in line.split(":", 1)[1].split() if f.startswith(keep))
    except OSError:
        pass
    return "unknown"


def machine_line() -> str:
    """What every report ends with, so its figures are recorded with the machine they came from."""
    import datetime as dt
    return (f"(record in docs/performance.md: {cpu_model()}; flags {cpu_simd_flags()}; "
            f"{dt.datetime.now(dt.timezone.utc):%Y-%m-%d %H:%M} UTC)")


def ints(text: str) -> list[int]:
    """A comma-separated list of whole numbers (the scripts' level options)."""
    return [int(x) for x in text.split(",") if x.strip()]


# ---------------------------------------------------------------------------------------
# the drivers' skeleton: the options every one has, and the raw record


def parser(doc: str | None, *, rounds: int | None = None, rounds_help: str = "A/B rounds (interleaved)",
           json_help: str = "write the raw record here") -> argparse.ArgumentParser:
    """A driver's argument parser: its docstring (or the part of it given) as the help text, with
    --json PATH, and --rounds N (default `rounds`) for a driver that interleaves rounds. Each driver
    adds only the options of what it measures."""
    p = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    if rounds is not None:
        p.add_argument("--rounds", type=int, default=rounds, help=rounds_help)
    p.add_argument("--json", type=Path, metavar="PATH", help=json_help)
    return p


def write_record(path: Path | None, record: object, indent: int | None = 1) -> None:
    """The raw record as JSON at `path` (--json; nothing when it was not given). Paths, dates and
    the like are written as their str. Drivers that run long call it after every round as well, so
    an interrupted run keeps what it measured."""
    if path is not None:
        path.write_text(json.dumps(record, indent=indent, default=str))


# ---------------------------------------------------------------------------------------
# servers: testkit's harness (the tests' too), under the names and log files the reports use


def server_proc(name: str, argv: list[str], port: int, ready_path: str, env: dict[str, str | None] | None = None,
                config_text: str | None = None) -> ServerProcess:
    """A server other than modelyard (a peer, the stub upstream), ready when `ready_path` says
    200; not started yet (see `start_server`)."""
    return ServerProcess(argv, port, Path(f"{name}.log"), name=name, ready_path=ready_path, env=env,
                         config_text=config_text)


def modelyard_proc(workdir: Path, config_text: str, port: int, name: str = "modelyard") -> ServerProcess:
    """`python -m modelyard serve` on this checkout's source with config_text (written to
    <workdir>/<name>.toml) on `port`; not started yet."""
    return modelyard_process(workdir, config_text, name=name, port=port)


def start_server(server: ServerProcess, workdir: Path, timeout: float = 120.0) -> float:
    """Start `server` in `workdir`, logging to a new <workdir>/<name>.<ms>.log (the scripts start
    a server again between rounds, and each start's log is kept); the seconds until it was ready."""
    server.cwd = workdir
    server.log = workdir / f"{server.name}.{int(time.time() * 1000)}.log"
    return start_ready(server, timeout=timeout)


# ---------------------------------------------------------------------------------------
# the one SSE client


@dataclass
class Stream:
    """One streamed completion or chat completion, as the client saw it. Times are seconds
    after the request was sent."""

    status: int | None = None           # HTTP status; None: no response (see error)
    ttft: float | None = None           # first chunk with text
    token_times: list[float] = field(default_factory=list)   # every chunk with text
    texts: dict[int, str] = field(default_factory=dict)      # choice index -> text
    finish_reasons: dict[int, str] = field(default_factory=dict)
    usage: dict | None = None           # the usage chunk (stream_options.include_usage)
    events: int = 0                     # JSON events read
    done: bool = False                  # [DONE] seen
    closed_early: bool = False          # the caller's close_after cut the stream
    error: str | None = None            # non-200 body, error event, transport error, cancellation
    exception: str | None = None        # the transport error's type (no answer, or a cut one)
    total: float | None = None          # send -> end of stream

    @property
    def text(self) -> str:
        return "".join(self.texts[k] for k in sorted(self.texts))

    @property
    def finish_reason(self) -> str | None:
        return self.finish_reasons.get(0) or next(iter(self.finish_reasons.values()), None)

    @property
    def completion_tokens(self) -> int:
        """The server's count when it sent usage, else one per text chunk."""
        if self.usage and self.usage.get("completion_tokens") is not None:
            return int(self.usage["completion_tokens"])
        return len(self.token_times)

    @property
    def tpot(self) -> float | None:
        """(last text chunk - first) / (completion tokens - 1): decode time per output token."""
        n = self.completion_tokens
        return (self.token_times[-1] - self.token_times[0]) / (n - 1) if n > 1 and self.token_times else None

    @property
    def ok(self) -> bool:
        return self.status == 200 and self.error is None and self.done


def _piece(choice: dict) -> str:
    if "delta" in choice:
        return (choice.get("delta") or {}).get("content") or ""
    return choice.get("text") or ""


def _error_message(raw: bytes) -> str:
    try:
        err = json.loads(raw).get("error")
        if isinstance(err, dict) and err.get("message"):
            return str(err["message"])[:300]
    except (ValueError, AttributeError):
        pass
    return raw[:300].decode(errors="replace")


async def stream(client: httpx.AsyncClient, url: str, body: dict, headers: dict | None = None,
                 close_after: int = 0, out: Stream | None = None) -> Stream:
    """POST body (with "stream": true) to url and read the SSE answer. close_after > 0: leave
    after that many events (a client disconnecting mid-stream). `out`, when given, is filled in
    place, so a caller that is cancelled still holds what arrived. Transport errors and bad JSON
    become `error`; cancellation is recorded and re-raised."""
    res = out if out is not None else Stream()
    t0 = time.perf_counter()
    try:
        async with client.stream("POST", url, json={**body, "stream": True}, headers=headers) as resp:
            res.status = resp.status_code
            if resp.status_code != 200:
                res.error = f"HTTP {resp.status_code}: {_error_message(await resp.aread())}"
                return res
            async for line in resp.aiter_lines():
                if not line.startswith("data:"):
                    continue
                data = line[5:].strip()
                if data == "[DONE]":
                    res.done = True
                    break
                event = json.loads(data)
                now = time.perf_counter() - t0
                res.events += 1
                if event.get("error"):
                    res.error = res.error or f"error event: {str(event['error'])[:300]}"
                for ch in event.get("choices") or ():
                    i = ch.get("index", 0)
                    piece = _piece(ch)
                    res.texts[i] = res.texts.get(i, "") + piece
                    if piece:
                        res.token_times.append(now)
                        if res.ttft is None:
                            res.ttft = now
                    if ch.get("finish_reason"):
                        res.finish_reasons[i] = ch["finish_reason"]
                if event.get("usage"):
                    res.usage = event["usage"]
                if close_after and res.events >= close_after:
                    res.closed_early = True
                    return res       # leaving the block closes the connection mid-stream
            if not res.done and res.error is None:
                res.error = "the stream ended without [DONE]"
    except (httpx.HTTPError, ValueError) as exc:
        res.exception = type(exc).__name__
        res.error = f"{type(exc).__name__}: {exc}"[:300]
    except asyncio.CancelledError:
        res.error = "cancelled"
        raise
    finally:
        res.total = time.perf_counter() - t0
    return res
