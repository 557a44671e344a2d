"""Hostile clients against one modelyard server, while an honest client streams (issue 19).

    .venv/bin/python bench/hostile.py [--rounds 2] [--honest 12] [--seconds 40] [--json PATH]

One server on loopback (smollm2-135m: parallel 4, context 1024, threads 1; an API key; an admin
token, so the control plane and its SSE stream are on; header_timeout 5 s). Rounds alternate
quiet / hostile (Q H Q H ...). In every round the honest client streams --honest completions
one after another (32 tokens each) and a poller asks /health every 50 ms. In a hostile round,
for at most --seconds, these run beside it:

  slowloris    300 sockets that send half a request head and then nothing (held for 8 s, so
               the server's header_timeout closes them), opened again in waves
  bodies       unauthenticated 20 MB chunked bodies by POST, PUT, PATCH and DELETE, in turn
  quadratic    an 800 kB a.a.a.… model name, and 90,000 blank lines as a grammar (under the
               100,000-character grammar bound, so it reaches the grammar path)
  unknown      thousands of requests naming models nobody serves
  sse          48 open /api/v1/control/model-endpoints/events streams (admin token), held
  garbage      malformed JSON bodies

Reported: the honest client's TTFT p50/p99 in quiet and hostile rounds (and their ratio), the
server's RSS and open descriptors before and after, /health's worst latency and failures, and
the attackers' answers by status. Bounded: every attacker stops at the round's end, every
socket and request has a timeout, the server is stopped by PID. Record in docs/reliability.md.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import secrets
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

import httpx

from common import free_port, machine_line, modelyard_proc, parser, percentile, start_server, stream, write_record

MODEL = "smollm2-135m"


def config(key: str, admin: str, db: Path) -> str:
    return f"""[server]
api_keys = ["{key}"]
log_level = "warning"
header_timeout = 5
database_url = "sqlite:///{db}"

[[admin_tokens]]
name = "ops"
token = "{admin}"

[[endpoints]]
name = "{MODEL}"
model = "{MODEL}"
context = 1024
parallel = 4
threads = 1
"""


def rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    return 0


def open_fds(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


class Round:
    def __init__(self, kind: str) -> None:
        self.kind = kind
        self.ttft: list[float] = []
        self.honest_failed: list[str] = []
        self.health_worst = 0.0
        self.health_failed = 0
        self.health_answers = 0
        self.attacks: Counter[str] = Counter()


async def honest(client: httpx.AsyncClient, base: str, key: str, n: int, r: Round) -> None:
    for i in range(n):
        s = await stream(client, f"{base}/v1/completions",
                         {"model": MODEL, "prompt": f"Write about the sea, part {i}:", "max_tokens": 32,
                          "temperature": 0}, headers={"Authorization": f"Bearer {key}"})
        if s.ok and s.ttft is not None:
            r.ttft.append(s.ttft)
        else:
            r.honest_failed.append(s.error or f"HTTP {s.status}")


async def health(base: str, stop: asyncio.Event, r: Round) -> None:
    async with httpx.AsyncClient(timeout=10) as c:
        while not stop.is_set():
            t0 = time.perf_counter()
            try:
                ok = (await c.get(base + "/health")).status_code == 200
            except httpx.HTTPError:
                ok = False
            r.health_worst = max(r.health_worst, time.perf_counter() - t0)
            r.health_answers += ok
            r.health_failed += not ok
            await asyncio.sleep(0.05)


async def slowloris(port: int, until: float, r: Round) -> None:
    while time.monotonic() < until:
        writers = []
        for _ in range(300):
            try:
                _, w = await asyncio.wait_for(asyncio.open_connection("127.0.0.1", port), 5)
                w.write(b"POST /v1/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Slow: ")
                writers.append(w)
            except (OSError, asyncio.TimeoutError):
                r.attacks["slowloris refused"] += 1
        r.attacks["slowloris opened"] += len(writers)
        await asyncio.sleep(min(8.0, max(0.0, until - time.monotonic())))
        for w in writers:
            w.close()


async def bodies(base: str, until: float, r: Round) -> None:
    async def chunks():
        block = b"x" * 65536
        for _ in range(20 * 16):           # 20 MiB
            yield block
    methods = ["POST", "PUT", "PATCH", "DELETE"]
    paths = ["/v1/completions", "/api/v1/control/api-keys/key_x", "/api/v1/control/model-endpoints/ep_x"]
    async with httpx.AsyncClient(timeout=20) as c:
        i = 0
        while time.monotonic() < until:
            method, path = methods[i % 4], paths[i % 3]
            try:
                resp = await c.request(method, base + path, content=chunks())
                r.attacks[f"body {resp.status_code}"] += 1
            except httpx.HTTPError as exc:
                r.attacks[f"body {type(exc).__name__}"] += 1
            i += 1


async def quadratic(base: str, key: str, until: float, r: Round) -> None:
    """The two inputs that were quadratic, each in a loop of its own (one slow answer does not
    hold the other back)."""
    auth = {"Authorization": f"Bearer {key}"}

    async def loop(label: str, body: dict) -> None:
        async with httpx.AsyncClient(timeout=60) as c:
            while time.monotonic() < until:
                resp = await c.post(base + "/v1/completions", json=body, headers=auth)
                r.attacks[f"{label} {resp.status_code}"] += 1
    await asyncio.gather(loop("long name", {"model": "a." * 400_000, "prompt": "x"}),
                         loop("blank grammar", {"model": MODEL, "prompt": "x", "max_tokens": 1,
                                                "grammar": "\n" * 90_000}))


async def unknown(base: str, key: str, until: float, r: Round) -> None:
    auth = {"Authorization": f"Bearer {key}"}
    async with httpx.AsyncClient(timeout=30) as c:
        while time.monotonic() < until:
            resp = await c.post(base + "/v1/completions", json={"model": secrets.token_hex(8), "prompt": "x"},
                                headers=auth)
            r.attacks[f"unknown {resp.status_code}"] += 1


async def sse(base: str, admin: str, until: float, r: Round) -> None:
    async def hold(c: httpx.AsyncClient) -> None:
        try:
            async with c.stream("GET", base + "/api/v1/control/model-endpoints/events",
                                headers={"Authorization": f"Bearer {admin}"}) as resp:
                r.attacks[f"sse {resp.status_code}"] += 1
                async for _ in resp.aiter_bytes():
                    if time.monotonic() >= until:
                        return
        except httpx.HTTPError as exc:
            r.attacks[f"sse {type(exc).__name__}"] += 1
    async with httpx.AsyncClient(timeout=httpx.Timeout(30, read=60),
                                 limits=httpx.Limits(max_connections=64)) as c:
        tasks = [asyncio.create_task(hold(c)) for _ in range(48)]
        try:
            await asyncio.sleep(max(0.0, until - time.monotonic()))
        finally:                            # also when this attacker is cancelled at the round's end
            for t in tasks:
                t.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)


async def garbage(base: str, key: str, until: float, r: Round) -> None:
    auth = {"Authorization": f"Bearer {key}", "Content-Type": "application/json"}
    junk = [b"{", b'{"model": ', b"[" * 10_000, b'{"model": "x", "prompt": "\xff\xfe"}', b"null", b'{"a":' * 5000]
    async with httpx.AsyncClient(timeout=30) as c:
        i = 0
        while time.monotonic() < until:
            resp = await c.post(base + "/v1/completions", content=junk[i % len(junk)], headers=auth)
            r.attacks[f"garbage {resp.status_code}"] += 1
            i += 1


async def one_round(kind: str, base: str, port: int, key: str, admin: str, args: argparse.Namespace) -> Round:
    r = Round(kind)
    stop = asyncio.Event()
    poller = asyncio.create_task(health(base, stop, r))
    attackers = []
    if kind == "hostile":
        until = time.monotonic() + args.seconds
        attackers = [asyncio.create_task(a) for a in (
            slowloris(port, until, r), bodies(base, until, r), quadratic(base, key, until, r),
            unknown(base, key, until, r), sse(base, admin, until, r), garbage(base, key, until, r))]
        await asyncio.sleep(2)              # the attack under way before the honest client starts
    async with httpx.AsyncClient(timeout=120) as c:
        await asyncio.wait_for(honest(c, base, key, args.honest, r), args.seconds + 120)
    for a in attackers:
        a.cancel()
    await asyncio.gather(*attackers, return_exceptions=True)
    stop.set()
    await poller
    return r


def main(argv: list[str] | None = None) -> int:
    p = parser(__doc__.split("\n\n")[0], rounds=2, rounds_help="quiet/hostile pairs (interleaved)",
               json_help="write the figures here")
    p.add_argument("--honest", type=int, default=12, help="honest streams per round")
    p.add_argument("--seconds", type=float, default=40.0, help="how long the attack runs per hostile round")
    args = p.parse_args(argv)

    key, admin = "sk-" + secrets.token_hex(12), "adm-" + secrets.token_hex(12)
    with tempfile.TemporaryDirectory(prefix="modelyard-hostile-") as tmp:
        port = free_port()
        srv = modelyard_proc(Path(tmp), config(key, admin, Path(tmp) / "control.db"), port)
        srv.argv += ["--port", str(port)]
        start_server(srv, Path(tmp), timeout=180)
        try:
            pid = srv.pid
            # a warm-up stream, then the starting sample
            asyncio.run(one_round("warm-up", srv.base, port, key, admin, argparse.Namespace(honest=2, seconds=0)))
            before = {"rss_kib": rss_kib(pid), "fds": open_fds(pid)}
            rounds = []
            for _ in range(args.rounds):
                for kind in ("quiet", "hostile"):
                    rounds.append(asyncio.run(one_round(kind, srv.base, port, key, admin, args)))
                    print(f"{kind}: ttft p50 {percentile(rounds[-1].ttft, 0.5)}, health worst "
                          f"{rounds[-1].health_worst:.3f} s, failed {rounds[-1].health_failed}", file=sys.stderr)
            time.sleep(8)                   # past header_timeout: what the attack left is closed
            after = {"rss_kib": rss_kib(pid), "fds": open_fds(pid)}
            errors = [line for line in srv.log_lines() if "Traceback" in line or " ERROR " in line]
        finally:
            srv.stop()

    def ttfts(kind: str) -> list[float]:
        return [t for r in rounds if r.kind == kind for t in r.ttft]

    quiet, hostile = ttfts("quiet"), ttfts("hostile")
    figures = {
        "honest_ttft_quiet": {"p50": percentile(quiet, 0.5), "p99": percentile(quiet, 0.99), "n": len(quiet)},
        "honest_ttft_hostile": {"p50": percentile(hostile, 0.5), "p99": percentile(hostile, 0.99), "n": len(hostile)},
        "honest_failed": [f for r in rounds for f in r.honest_failed],
        "health": {kind: {"worst_s": max(r.health_worst for r in rounds if r.kind == kind),
                          "answers": sum(r.health_answers for r in rounds if r.kind == kind),
                          "failed": sum(r.health_failed for r in rounds if r.kind == kind)}
                   for kind in ("quiet", "hostile")},
        "attacks": dict(sum((r.attacks for r in rounds), Counter())),
        "server_before": before, "server_after": after, "server_exit": srv.exit_code,
        "server_log_errors": errors[:20], "machine": machine_line(),
    }
    q50, h50 = figures["honest_ttft_quiet"]["p50"], figures["honest_ttft_hostile"]["p50"]
    q99, h99 = figures["honest_ttft_quiet"]["p99"], figures["honest_ttft_hostile"]["p99"]
    print(json.dumps(figures, indent=2))
    if q50 and h50 and q99 and h99:
        print(f"honest TTFT p50 {q50 * 1000:.0f} -> {h50 * 1000:.0f} ms ({h50 / q50:.2f}x), "
              f"p99 {q99 * 1000:.0f} -> {h99 * 1000:.0f} ms ({h99 / q99:.2f}x); /health never failed: "
              f"{figures['health']['hostile']['failed'] == 0}; RSS {before['rss_kib'] // 1024} -> "
              f"{after['rss_kib'] // 1024} MiB; fds {before['fds']} -> {after['fds']}")
    if args.json:
        write_record(args.json, figures, indent=2)
    ok = not figures["honest_failed"] and figures["health"]["hostile"]["failed"] == 0 and not errors
    print("HOSTILE PASS" if ok else "HOSTILE FAIL")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
