"""Soak test: one modelyard server under a long, mixed, seeded load; looks for leaks and 5xx.

    .venv/bin/python bench/soak.py [--minutes 10] [--concurrency 32] [--seed 0]
                                   [--timeout 120] [--json PATH] [--keep]

What it does:
  1. writes a temporary config (one endpoint smollm2-135m: parallel 16, context 1024,
     max_queue 64, threads 2; one random API key) and starts `python -m modelyard serve`
     on a free loopback port, logging to a file of its own; waits for GET /ready;
  2. warm-up: ~20 valid requests of the mix (kept apart from the figures), then the first
     resident-memory sample (VmRSS from /proc/<pid>/status);
  3. for --minutes, --concurrency asyncio workers send requests, each one's kind and body drawn
     from random.Random(f"{seed}:{i}") for the i-th request (the same plan every run):
       complete      non-streaming completion, temperature 0 or 0.7
       stream        streaming completion (sometimes with stream_options.include_usage)
       n_multi       n = 2..3, temperature 0.8, streaming or not
       stop          stop strings (checked: never in the returned text)
       seeded        temperature 0.9 + seed, a few (prompt, seed, max_tokens) groups
                     (checked: every answer in a group is the same text, streamed or not)
       chat          /chat/completions, streaming or not
       disconnect    streaming, the client closes after 2-3 chunks
       bad_temp      temperature out of range                 -> 422 expected
       unknown_model a model nobody serves                    -> 404 expected
       missing_auth  no Authorization header (or a wrong key) -> 401 expected
       big_max_tok   max_tokens past the context (1024)       -> 400 expected
     max_tokens 8..64; every request has a total client timeout (--timeout); RSS is sampled
     every 30 s;
  4. waits --idle seconds, then reads GET /api/v1/endpoints/smollm2-135m (in_flight and
     slots_used must be 0; polled a little longer so a slow release shows as such) and the
     last RSS sample; sends SIGTERM and reports the server's exit code;
  5. prints requests by kind and status, unexpected outcomes (any 5xx but 503, any timeout,
     any connection error), p50/p99 latency of successful requests, RSS start/end/max, the
     server log's ERROR/Traceback lines, and PASS/FAIL lines. Exit code 1 on any FAIL.

Bounded everywhere: the load phase stops sending at the deadline (and after --max-requests),
every request has a timeout, the whole load phase has a hard cap, the server is stopped by PID.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime as dt
import itertools
import json
import os
import platform
import random
import secrets
import shutil
import sys
import tempfile
import time
from collections import Counter, defaultdict
from dataclasses import asdict, dataclass, field
from pathlib import Path

import httpx

from common import (ServerProcess, Stream, cpu_model, free_port, modelyard_proc, parser, percentile, start_server,
                    stream, write_record)

ENDPOINT = "smollm2-135m"
PARALLEL, CONTEXT, MAX_QUEUE, THREADS = 16, 1024, 64, 2
GRACE = 10                      # the server's grace_period (seconds) on SIGTERM
OPENAI = "/api/v1/compatibility/openai/v1"
WARMUP = 20
RSS_EVERY = 30.0
RSS_GROWTH_LIMIT = 0.10

# kind -> (weight, expected status)
KINDS: dict[str, tuple[int, int]] = {
    "complete": (14, 200),
    "stream": (14, 200),
    "n_multi": (10, 200),
    "stop": (10, 200),
    "seeded": (10, 200),
    "chat": (12, 200),
    "disconnect": (8, 200),
    "bad_temp": (5, 422),
    "unknown_model": (5, 404),
    "missing_auth": (5, 401),
    "big_max_tok": (5, 400),
}
VALID = [k for k, (_, s) in KINDS.items() if s == 200]
INVALID = [k for k, (_, s) in KINDS.items() if s != 200]

PROMPTS = [
    "The capital of France is",
    "Once upon a time, in a small village by the sea,",
    "Here is a list of fruits: apple, banana,",
    "def fibonacci(n):",
    "The three primary colors are",
    "In 1969, astronauts landed on",
    "My favourite recipe for pancakes starts with",
    "Q: What is the boiling point of water?\nA:",
    "The quick brown fox",
    "Dear hiring manager, I am writing to apply for",
    "Photosynthesis is the process by which",
    "1, 2, 3, 4, 5,",
    "The best way to learn a new language is",
    "Rain fell on the old roof while",
    "A haiku about autumn:\n",
    "Translate to French: good morning ->",
]
CHATS = [
    "What is the capital of Italy?",
    "Write one sentence about the moon.",
    "List three animals that live in the ocean.",
    "How do I boil an egg?",
    "Say hello in Spanish.",
    "What is 2 + 2?",
    "Give me a name for a cat.",
    "Describe a sunset in a few words.",
]
STOPS = [["."], ["\n"], [",", "."], [" the"], ["\n\n", "!"], ["a"]]
SEEDED_PROMPTS = PROMPTS[:3]
SEEDS = [1, 7, 42]


# ---------------------------------------------------------------------------------------
# the plan: request i -> its kind and body, from its own seeded RNG


@dataclass
class Spec:
    i: int
    kind: str
    path: str                       # under OPENAI
    body: dict
    stream: bool
    auth: str = "key"               # key | none | wrong
    n: int = 1
    stops: list[str] = field(default_factory=list)
    group: str | None = None        # seeded determinism group
    close_after: int = 0            # disconnect: chunks to read before closing


def plan(seed: int, i: int, kinds: list[str] | None = None) -> Spec:
    rng = random.Random(f"{seed}:{i}")
    names = kinds or list(KINDS)
    kind = rng.choices(names, weights=[KINDS[k][0] for k in names])[0]
    max_tokens = rng.randint(8, 64)
    prompt = rng.choice(PROMPTS)
    base = {"model": ENDPOINT, "prompt": prompt, "max_tokens": max_tokens}
    if kind == "complete":
        return Spec(i, kind, "/completions", {**base, "temperature": rng.choice([0, 0.7])}, False)
    if kind == "stream":
        body = {**base, "stream": True, "temperature": rng.choice([0, 0.7])}
        if rng.random() < 0.5:
            body["stream_options"] = {"include_usage": True}
        return Spec(i, kind, "/completions", body, True)
    if kind == "n_multi":
        n = rng.randint(2, 3)
        stream = rng.random() < 0.5
        return Spec(i, kind, "/completions", {**base, "n": n, "temperature": 0.8, "stream": stream}, stream, n=n)
    if kind == "stop":
        stops = rng.choice(STOPS)
        stream = rng.random() < 0.3
        return Spec(i, kind, "/completions", {**base, "stop": stops, "temperature": 0, "stream": stream},
                    stream, stops=list(stops))
    if kind == "seeded":
        p, s, mt = rng.randrange(len(SEEDED_PROMPTS)), rng.choice(SEEDS), rng.choice([16, 32])
        stream = rng.random() < 0.5
        body = {"model": ENDPOINT, "prompt": SEEDED_PROMPTS[p], "max_tokens": mt, "temperature": 0.9,
                "top_p": 0.95, "seed": s, "stream": stream}
        return Spec(i, kind, "/completions", body, stream, group=f"p{p}-s{s}-m{mt}")
    if kind == "chat":
        stream = rng.random() < 0.5
        body = {"model": ENDPOINT, "messages": [{"role": "user", "content": rng.choice(CHATS)}],
                "max_tokens": max_tokens, "temperature": rng.choice([0, 0.7]), "stream": stream}
        return Spec(i, kind, "/chat/completions", body, stream)
    if kind == "disconnect":
        return Spec(i, kind, "/completions", {**base, "max_tokens": rng.randint(32, 64), "stream": True,
                                              "temperature": 0.7}, True, close_after=rng.randint(2, 3))
    if kind == "bad_temp":
        return Spec(i, kind, "/completions", {**base, "temperature": rng.choice([2.5, -1, 7, 100])}, False)
    if kind == "unknown_model":
        return Spec(i, kind, "/completions", {**base, "model": f"no-such-model-{rng.randint(0, 99)}"}, False)
    if kind == "missing_auth":
        return Spec(i, kind, "/completions", base, False, auth=rng.choice(["none", "none", "wrong"]))
    if kind == "big_max_tok":
        return Spec(i, kind, "/completions", {**base, "max_tokens": rng.choice([1100, 4096, 100_000])},
                    rng.random() < 0.3)
    raise AssertionError(kind)


# ---------------------------------------------------------------------------------------
# one request


@dataclass
class Record:
    i: int
    kind: str
    phase: str
    stream: bool
    status: int | str = "?"          # HTTP status, or "timeout" / "conn_error"
    latency: float = 0.0             # seconds, send -> last byte (or close, for disconnects)
    ttft: float | None = None        # streaming: send -> first chunk with text
    chunks: int = 0
    completion_tokens: int | None = None
    texts: list[str] = field(default_factory=list)
    problem: str | None = None       # malformed answer, wrong status for an invalid kind, ...
    group: str | None = None
    error: str | None = None         # error body's message or the exception


def _text_of(choice: dict, chat: bool) -> str:
    """A non-streamed choice's text (streamed ones: common.stream)."""
    if not chat:
        return choice.get("text") or ""
    return (choice.get("message") or {}).get("content") or ""


async def send(client: httpx.AsyncClient, base: str, key: str, spec: Spec, phase: str, timeout: float) -> Record:
    rec = Record(spec.i, spec.kind, phase, spec.stream, group=spec.group)
    headers = {}
    if spec.auth == "key":
        headers["Authorization"] = f"Bearer {key}"
    elif spec.auth == "wrong":
        headers["Authorization"] = "Bearer sk-wrong-" + secrets.token_hex(4)
    url = base + OPENAI + spec.path
    chat = spec.path.startswith("/chat")
    t0 = time.perf_counter()
    try:
        await asyncio.wait_for(_exchange(client, url, headers, spec, rec, chat), timeout)
    except asyncio.TimeoutError:
        rec.status = "timeout"
        rec.error = f"no complete answer within {timeout:.0f}s"
    except httpx.HTTPError as exc:
        rec.status = "conn_error"
        rec.error = f"{type(exc).__name__}: {exc}"
    rec.latency = time.perf_counter() - t0
    expected = KINDS[spec.kind][1]
    if isinstance(rec.status, int) and rec.status != 503 and rec.status != expected and rec.problem is None:
        rec.problem = f"expected {expected}, got {rec.status}: {rec.error or ''}"[:300]
    return rec


async def _exchange(client: httpx.AsyncClient, url: str, headers: dict, spec: Spec, rec: Record,
                    chat: bool) -> None:
    if not spec.stream:
        r = await client.post(url, json=spec.body, headers=headers)
        rec.status = r.status_code
        try:
            data = r.json()
        except ValueError:
            data = None
        if r.status_code != 200:
            err = (data or {}).get("error") if isinstance(data, dict) else None
            rec.error = (err or {}).get("message") if isinstance(err, dict) else (r.text[:200] or None)
            return
        if not isinstance(data, dict) or not isinstance(data.get("choices"), list):
            rec.problem = f"200 without choices: {r.text[:200]}"
            return
        choices = sorted(data["choices"], key=lambda c: c.get("index", 0))
        rec.texts = [_text_of(c, chat) for c in choices]
        rec.completion_tokens = (data.get("usage") or {}).get("completion_tokens")
        if len(choices) != spec.n:
            rec.problem = f"{len(choices)} choices for n={spec.n}"
        _check_stops(spec, rec)
        return
    s: Stream = await stream(client, url, spec.body, headers, close_after=spec.close_after)
    rec.status, rec.ttft, rec.chunks = s.status or rec.status, s.ttft, s.events
    rec.completion_tokens = (s.usage or {}).get("completion_tokens")
    if s.exception and s.exception != "JSONDecodeError":
        rec.status, rec.error = "conn_error", s.error
        return
    if s.status != 200:
        rec.error = s.error
        return
    if s.closed_early:
        return
    rec.texts = [s.texts[k] for k in sorted(s.texts)]
    if s.error:
        rec.problem = f"in a 200 stream: {s.error}"[:300]
    elif len(s.texts) != spec.n:
        rec.problem = f"{len(s.texts)} choices streamed for n={spec.n}"
    _check_stops(spec, rec)


def _check_stops(spec: Spec, rec: Record) -> None:
    for t in rec.texts:
        for s in spec.stops:
            if s in t and rec.problem is None:
                rec.problem = f"stop string {s!r} in the text {t[-60:]!r}"


# ---------------------------------------------------------------------------------------
# the server


def rss_kib(pid: int) -> int | None:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    except (OSError, ValueError, IndexError):
        return None
    return None


def soak_server(workdir: Path, key: str, log_level: str) -> ServerProcess:
    port = free_port()
    text = (f'[server]\nhost = "127.0.0.1"\nport = {port}\napi_keys = ["{key}"]\n'
            f'log_level = "{log_level}"\ngrace_period = {GRACE}\n\n'
            f'[[endpoints]]\nname = "{ENDPOINT}"\nmodel = "smollm2-135m"\nparallel = {PARALLEL}\n'
            f'context = {CONTEXT}\nmax_queue = {MAX_QUEUE}\nthreads = {THREADS}\n')
    srv = modelyard_proc(workdir, text, port, name="soak")
    srv.stop_timeout = GRACE + 30       # SIGKILL only if it outlives the grace period by far (reported)
    return srv


def bad_log_lines(lines: list[str]) -> list[str]:
    return [ln for ln in lines if " ERROR " in ln or " CRITICAL " in ln or ln.startswith("Traceback")]


# ---------------------------------------------------------------------------------------
# the run


@dataclass
class Results:
    meta: dict
    records: list[Record] = field(default_factory=list)
    rss: list[dict] = field(default_factory=list)        # {"t": s since load start, "kib": ..., "at": label}
    endpoint_after_idle: dict | None = None
    endpoint_final: dict | None = None
    idle_release_s: float | None = None
    server_exit: int | None = None
    server_stop_s: float | None = None
    log_errors: list[str] = field(default_factory=list)
    log_warnings: int = 0
    checks: dict[str, bool] = field(default_factory=dict)


async def drive(args: argparse.Namespace, srv: ServerProcess, key: str, res: Results) -> None:
    limits = httpx.Limits(max_connections=args.concurrency + 8, max_keepalive_connections=args.concurrency + 8)
    timeout = httpx.Timeout(args.timeout, connect=10.0)
    async with httpx.AsyncClient(limits=limits, timeout=timeout) as client:
        # warm-up: valid kinds only, at most 8 at once; a plan seeded apart, so the plan
        # of the measured phase does not depend on it
        warm_ids = iter(range(WARMUP))

        async def warm_worker() -> None:
            for j in warm_ids:
                spec = plan(args.seed + 1_000_003, j, VALID)
                res.records.append(await send(client, srv.base, key, spec, "warmup", args.timeout))

        t_warm = time.monotonic()
        await asyncio.wait_for(asyncio.gather(*(warm_worker() for _ in range(min(8, args.concurrency)))),
                               WARMUP * args.timeout)
        t_load = time.monotonic()
        res.meta["warmup_seconds"] = round(t_load - t_warm, 1)
        res.rss.append({"t": 0.0, "kib": rss_kib(srv.pid), "at": "start (after warm-up)"})
        print(f"warm-up done ({WARMUP} requests in {t_load - t_warm:.0f}s); RSS {res.rss[0]['kib']} KiB; load for {args.minutes} min "
              f"at concurrency {args.concurrency}", flush=True)

        deadline = t_load + args.minutes * 60
        counter = itertools.count()
        stop_sampling = asyncio.Event()

        async def sampler() -> None:
            k = 1
            while not stop_sampling.is_set():
                try:
                    await asyncio.wait_for(stop_sampling.wait(), max(0.0, t_load + k * RSS_EVERY - time.monotonic()))
                except asyncio.TimeoutError:
                    res.rss.append({"t": round(time.monotonic() - t_load, 1), "kib": rss_kib(srv.pid), "at": "load"})
                    done = sum(1 for r in res.records if r.phase == "load")
                    print(f"  t={time.monotonic() - t_load:6.0f}s  requests {done:6d}  RSS {res.rss[-1]['kib']} KiB",
                          flush=True)
                    k += 1

        async def worker() -> None:
            while time.monotonic() < deadline:
                i = next(counter)
                if i >= args.max_requests:
                    return
                res.records.append(await send(client, srv.base, key, plan(args.seed, i), "load", args.timeout))

        sampling = asyncio.ensure_future(sampler())
        hard_cap = args.minutes * 60 + args.timeout + 60
        try:
            await asyncio.wait_for(asyncio.gather(*(worker() for _ in range(args.concurrency))), hard_cap)
        except asyncio.TimeoutError:
            print(f"load phase passed its hard cap of {hard_cap:.0f}s: cancelled", file=sys.stderr)
        finally:
            stop_sampling.set()
            await sampling
        load_s = time.monotonic() - t_load
        res.meta["load_seconds"] = round(load_s, 1)

        # idle, then the endpoint's books must be balanced
        await asyncio.sleep(args.idle)
        url = srv.base + f"/api/v1/endpoints/{ENDPOINT}"
        auth = {"Authorization": f"Bearer {key}"}
        t_idle = time.monotonic()
        for attempt in range(int(args.release_wait / 0.5) + 1):
            try:
                r = await client.get(url, headers=auth, timeout=10.0)
                state = r.json() if r.status_code == 200 else {"http_status": r.status_code, "body": r.text[:200]}
            except (httpx.HTTPError, ValueError) as exc:
                state = {"error": f"{type(exc).__name__}: {exc}"}
            if attempt == 0:
                res.endpoint_after_idle = state
            res.endpoint_final = state
            if state.get("in_flight") == 0 and state.get("slots_used") == 0:
                res.idle_release_s = round(args.idle + time.monotonic() - t_idle, 1)
                break
            await asyncio.sleep(0.5)
        res.rss.append({"t": round(time.monotonic() - t_load, 1), "kib": rss_kib(srv.pid), "at": "end (after idle)"})


def is_unexpected(r: Record) -> bool:
    return r.status in ("timeout", "conn_error") or (isinstance(r.status, int) and r.status >= 500 and r.status != 503)


def report(res: Results, args: argparse.Namespace) -> bool:
    load = [r for r in res.records if r.phase == "load"]
    everything = res.records
    print()
    print(f"== soak: {res.meta['date']}  {res.meta['cpu']}  ({res.meta['cores']} cores)")
    print(f"   {args.minutes} min at concurrency {args.concurrency}, seed {args.seed}; "
          f"load phase {res.meta.get('load_seconds')} s, {len(load)} requests "
          f"({len(load) / max(1e-9, res.meta.get('load_seconds') or 1):.1f}/s) + {WARMUP} warm-up")

    print("\n-- requests by kind and status (load phase)")
    by_kind: dict[str, Counter] = defaultdict(Counter)
    for r in load:
        by_kind[r.kind][str(r.status)] += 1
    print(f"   {'kind':14} {'total':>6}  statuses")
    for kind in KINDS:
        c = by_kind.get(kind, Counter())
        print(f"   {kind:14} {sum(c.values()):6d}  " + ", ".join(f"{s}: {n}" for s, n in sorted(c.items())))
    totals = Counter(str(r.status) for r in load)
    print(f"   {'all':14} {len(load):6d}  " + ", ".join(f"{s}: {n}" for s, n in sorted(totals.items())))

    unexpected = [r for r in everything if is_unexpected(r)]
    print(f"\n-- unexpected outcomes (5xx other than 503, timeouts, connection errors): {len(unexpected)}")
    for r in unexpected[:30]:
        print(f"   #{r.i} {r.phase} {r.kind} stream={r.stream}: {r.status} after {r.latency:.1f}s  {r.error or ''}"[:240])
    problems = [r for r in everything if r.problem and not is_unexpected(r)]
    print(f"\n-- malformed or wrong answers (wrong 4xx, choices, [DONE], error events, stop leaks): {len(problems)}")
    for r in problems[:30]:
        print(f"   #{r.i} {r.phase} {r.kind} stream={r.stream}: {r.status}  {r.problem}"[:240])

    groups: dict[str, set[str]] = defaultdict(set)
    for r in everything:
        if r.group and r.status == 200 and not r.problem and r.texts:
            groups[r.group].add(r.texts[0])
    divergent = {g: v for g, v in groups.items() if len(v) > 1}
    print(f"\n-- seeded groups: {len(groups)}, answers that differed within a group: {len(divergent)}")
    for g, v in list(divergent.items())[:5]:
        print(f"   {g}: " + " | ".join(repr(t[:40]) for t in sorted(v))[:240])

    ok = [r for r in load if r.status == 200 and r.kind != "disconnect" and not r.problem]
    lat = [r.latency for r in ok]
    ttft = [r.ttft for r in ok if r.ttft is not None]
    tokens = sum(r.completion_tokens or 0 for r in ok)
    print(f"\n-- latency of successful requests (load phase, disconnects excluded): {len(ok)}")
    if lat:
        print(f"   p50 {percentile(lat, 0.5):.2f}s  p99 {percentile(lat, 0.99):.2f}s  max {max(lat):.2f}s;"
              f"  streaming TTFT p50 {percentile(ttft, 0.5) or 0:.2f}s p99 {percentile(ttft, 0.99) or 0:.2f}s;"
              f"  {tokens} completion tokens reported ({tokens / max(1e-9, res.meta.get('load_seconds') or 1):.1f}/s)")
        for kind in VALID:
            xs = [r.latency for r in ok if r.kind == kind]
            if xs:
                print(f"   {kind:14} n={len(xs):5d}  p50 {percentile(xs, 0.5):6.2f}s  p99 {percentile(xs, 0.99):6.2f}s")

    rss = [s["kib"] for s in res.rss if s["kib"]]
    start = res.rss[0]["kib"] if res.rss else None
    end = res.rss[-1]["kib"] if res.rss else None
    growth = (end - start) / start if start and end else None
    print("\n-- server resident memory (VmRSS)")
    if rss:
        print(f"   start {start / 1024:.1f} MiB  end {end / 1024:.1f} MiB  max {max(rss) / 1024:.1f} MiB  "
              f"growth {growth * 100:+.1f}%  ({len(res.rss)} samples)")
    print("   samples: " + ", ".join(f"{s['t']:.0f}s={(s['kib'] or 0) / 1024:.1f}" for s in res.rss))

    print(f"\n-- endpoint after {args.idle:.0f}s idle: " + json.dumps(res.endpoint_after_idle))
    if res.endpoint_final != res.endpoint_after_idle:
        print(f"   after polling {args.release_wait:.0f}s more: " + json.dumps(res.endpoint_final))
    print(f"-- server log: {len(res.log_errors)} ERROR/Traceback lines, {res.log_warnings} WARNING lines")
    for ln in res.log_errors[:10]:
        print("   " + ln[:240])
    print(f"-- server exit code after SIGTERM: {res.server_exit} (took {res.server_stop_s or 0:.1f}s)")

    final = res.endpoint_final or {}
    res.checks = {
        "no unexpected status (5xx other than 503, connection error)":
            not any(r.status == "conn_error" or (isinstance(r.status, int) and r.status >= 500 and r.status != 503)
                    for r in everything),
        "no timeout": not any(r.status == "timeout" for r in everything),
        "nothing in flight after idle": final.get("in_flight") == 0,
        "all slots free after idle": final.get("slots_used") == 0,
        f"RSS growth < {RSS_GROWTH_LIMIT:.0%} after warm-up": growth is not None and growth < RSS_GROWTH_LIMIT,
        "server exits 0 on SIGTERM": res.server_exit == 0,
        "answers well-formed, invalid requests get their 4xx": not problems,
        "seeded requests reproducible": not divergent,
        "no ERROR/Traceback in the server log": not res.log_errors,
    }
    print()
    for name, passed in res.checks.items():
        print(f"{'PASS' if passed else 'FAIL'}  {name}")
    return all(res.checks.values())


def main(argv: list[str] | None = None) -> int:
    p = parser(__doc__.split("\n\n")[0], json_help="write raw results (every request, RSS samples, checks) here")
    p.add_argument("--minutes", type=float, default=10.0, help="length of the load phase (default 10)")
    p.add_argument("--concurrency", type=int, default=32, help="requests in flight at once (default 32)")
    p.add_argument("--seed", type=int, default=0, help="seed of the request plan (default 0)")
    p.add_argument("--timeout", type=float, default=120.0, help="total client timeout per request, s (default 120)")
    p.add_argument("--max-requests", type=int, default=1_000_000, help="stop sending after this many (default 1e6)")
    p.add_argument("--idle", type=float, default=5.0, help="idle wait before reading the endpoint, s (default 5)")
    p.add_argument("--release-wait", type=float, default=15.0,
                   help="then poll this long for in_flight = slots_used = 0, s (default 15)")
    p.add_argument("--start-timeout", type=float, default=180.0, help="server readiness wait, s (default 180)")
    p.add_argument("--log-level", default="warning", help="the server's log level (default warning)")
    p.add_argument("--keep", action="store_true", help="keep the work dir (config, server log) even on PASS")
    args = p.parse_args(argv)
    if args.minutes <= 0 or args.concurrency < 1 or args.timeout <= 0:
        p.error("--minutes, --concurrency and --timeout must be positive")

    workdir = Path(tempfile.mkdtemp(prefix="modelyard-soak-"))
    key = "sk-soak-" + secrets.token_hex(8)
    srv = soak_server(workdir, key, args.log_level)
    res = Results(meta={
        "date": dt.datetime.now().astimezone().isoformat(timespec="seconds"), "cpu": cpu_model(),
        "cores": os.cpu_count(), "python": platform.python_version(), "args": vars(args) | {"json": str(args.json)},
        "server": {"parallel": PARALLEL, "context": CONTEXT, "max_queue": MAX_QUEUE, "threads": THREADS,
                   "grace_period": GRACE, "log_level": args.log_level},
        "workdir": str(workdir)})
    passed = False
    try:
        started = start_server(srv, workdir, args.start_timeout)
        print(f"server pid {srv.pid} on {srv.base} ready in {started:.1f}s; log {srv.log}", flush=True)
        res.meta["ready_seconds"] = round(started, 1)
        asyncio.run(drive(args, srv, key, res))
    except (RuntimeError, asyncio.TimeoutError) as exc:
        print(f"soak aborted: {exc!r}", file=sys.stderr)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
    finally:
        srv.stop()
        res.server_exit, res.server_stop_s = srv.exit_code, srv.stop_seconds
        lines = srv.log_lines()
        res.log_errors, res.log_warnings = bad_log_lines(lines), sum(" WARNING " in ln for ln in lines)
    if res.records:
        passed = report(res, args)
    else:
        print("no requests were made; server log tail:\n" + srv.log_tail(25), file=sys.stderr)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        out = {**asdict(res), "passed": passed}
        write_record(args.json, out)
        print(f"raw results: {args.json}")
    if passed and not args.keep:
        shutil.rmtree(workdir, ignore_errors=True)
    else:
        print(f"work dir kept: {workdir}")
    print("SOAK PASS" if passed else "SOAK FAIL")
    return 0 if passed else 1


if __name__ == "__main__":
    sys.exit(main())
