"""Gateway benchmark: modelyard's proxy engine against LiteLLM's proxy, both in front of the same
instant upstream (bench/stub_upstream.py), on loopback.

    .venv/bin/python bench/proxy.py [--rounds 2] [--quick] [--json PATH]
                                    [--api completions|chat] [--no-litellm] [--profile DIR] [--quotas]

Set-up: the stub runs for the whole benchmark; each round measures, one at a time,
  direct     the load generator straight to the stub (no gateway running),
  modelyard  `python -m modelyard serve --config T` with one engine = "openai" endpoint whose
             urls = [stub /v1],
  litellm    `litellm --config C --port P --num_workers 1`, C routing the same name to
             openai/<name> with api_base = stub /v1 and a dummy key; installed in its own venv
             (default ~/.cache/modelyard/peers/litellm-venv, see --litellm) so its dependencies
             never touch the project's,
each gateway started fresh for its turn and stopped by PID after it (A/B/A/B over --rounds).
Without LiteLLM (or with --no-litellm) it measures modelyard against direct only. LiteLLM's venv:
    python3 -m venv ~/.cache/modelyard/peers/litellm-venv
    ~/.cache/modelyard/peers/litellm-venv/bin/pip install 'litellm[proxy]==1.106.12'
(1.106.12: the newest whose [proxy] extra installs from the package index here; later ones pin
litellm-proxy, or post-releases of litellm-proxy-extras / litellm-enterprise, that it lacks).

Each turn: warm-up (20 + 20 sequential requests and a burst at the load concurrency, untimed),
then four timed phases through pooled httpx.AsyncClients, one per worker by default (--clients
one: one client shared by all workers). httpx's pool scans every connection it holds on each
request (a poll() per idle one), so one client holding 32 connections cost the generator 2-4x
the CPU per request here (about 2 ms, more than modelyard itself spends), which capped the
measured throughput at the generator's, not the gateway's; each worker's own client still
keeps its connection alive.
  latency    non-streaming, concurrency 1: p50 / p90 of send -> whole body
  ttft       streaming (stream_options.include_usage), concurrency 1: send -> first chunk with
             text, and the whole stream
  load       non-streaming, then streaming, at concurrency 32: completed requests / wall time,
             bounded by a request count and a time cap
Every answer is checked (text == the stub's, streams end with [DONE]); failures are counted.
Requests carry a random per-run API key, which both gateways require (LiteLLM will not start
without a master key; modelyard gets the same key in api_keys).
The stub counts TCP connections and HTTP requests; their differences over the timed phases give
upstream connections opened per 100 requests (a pooling gateway opens ~0 after warm-up, as it
reuses the connections it has; "pooled" below means < 10 per 100; one per request is ~100).
The load phases also report the gateway's CPU seconds per request (its process tree, from
/proc) and the load generator's own.

Derived, per round and then median [min-max] over rounds:
  added latency = gateway p50 - direct p50 (same round), same for TTFT;
  ratios modelyard / LiteLLM against issue 4's targets: added latency <= 0.25x, added TTFT
  <= 0.1x, throughput >= 3x (non-streaming) and >= 10x (streaming), connections pooled.
The load generator, the stub and the gateway share this machine's cores: throughput is that of
the whole loop (direct shows the generator + stub ceiling), CPU/request isolates the gateway.

--profile DIR: after the rounds, one extra untimed modelyard turn runs the load phases under
py-spy (.venv/bin/py-spy) and writes collapsed stacks to DIR, with the top frames printed.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import os
import platform
import secrets
import signal
import subprocess
import sys
import tempfile
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import httpx

import common
from common import (ServerProcess, cpu_model, free_port, median_spread as _med, parser, percentile, ratio as _ratio,
                    server_proc, start_server, write_record)
from testkit.redis_server import redis_server  # the tests' real redis-server on a unix socket

ROOT = Path(__file__).resolve().parent.parent
PEERS = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "modelyard" / "peers"
LITELLM = PEERS / "litellm-venv" / "bin" / "litellm"
PY_SPY = Path(sys.executable).parent / "py-spy"
MODEL = "bench-model"
ANSWER = "Hello from the stub."      # bench/stub_upstream.py's fixed answer
PROMPT = "Say hello."
# Both gateways run with authentication on, as deployed (LiteLLM refuses to start without a
# master key): one strong random key per run, sent on every request (the stub ignores it).
API_KEY = "sk-" + secrets.token_hex(32)

TARGETS = {"added_latency": 0.25, "added_ttft": 0.1, "rps_nonstream": 3.0, "rps_stream": 10.0}
# --quotas (issue 12): limits high enough never to refuse, so each request pays the admission
QUOTA_RPM, QUOTA_TPM = 100_000_000, 10_000_000_000
QUOTA_TARGETS = {"redis_added_p50_ms": 0.5, "rps_vs_litellm": 3.0}


# ---------------------------------------------------------------------------------------
# processes


def tree_cpu(pid: int) -> float:
    """CPU seconds (user + system) of pid and its live descendants."""
    tick = os.sysconf("SC_CLK_TCK")
    children: dict[int, list[int]] = {}
    cpu: dict[int, float] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            raw = Path(f"/proc/{entry}/stat").read_text()
        except OSError:
            continue
        rest = raw[raw.rfind(")") + 2:].split()
        ppid, ut, st = int(rest[1]), int(rest[11]), int(rest[12])
        children.setdefault(ppid, []).append(int(entry))
        cpu[int(entry)] = (ut + st) / tick
    total, todo = 0.0, [pid]
    while todo:
        p = todo.pop()
        total += cpu.get(p, 0.0)
        todo.extend(children.get(p, []))
    return total


def stub_proc(chunk_delay_ms: float) -> ServerProcess:
    port = free_port()
    return server_proc("stub", [sys.executable, str(ROOT / "bench" / "stub_upstream.py"), "--port", str(port),
                         "--chunk-delay-ms", str(chunk_delay_ms)], port, "/stats")


def gateway_proc(workdir: Path, stub: ServerProcess, quota: str | None = None,
                 redis_url: str | None = None) -> ServerProcess:
    """quota None: the key without limits; "memory" / "redis": the key with rpm and tpm limits
    (never reached: every request pays the admission, none is refused), counted in this
    process or in Redis (issue 12's shared quotas)."""
    port = free_port()
    keys = f'api_keys = ["{API_KEY}"]\n\n' if quota is None else (
        f'\n[[keys]]\nkey = "{API_KEY}"\nrpm = {QUOTA_RPM}\ntpm = {QUOTA_TPM}\n\n')
    if quota == "redis":
        keys += f'[quota]\nbackend = "redis"\nredis_url = "{redis_url}"\nprocesses = 1\n\n'
    return common.modelyard_proc(workdir, (
        f'[server]\nhost = "127.0.0.1"\nport = {port}\nlog_level = "warning"\ngrace_period = 2\n'
        f'{keys}'
        f'[[endpoints]]\nname = "{MODEL}"\nengine = "openai"\nurls = ["{stub.base}/v1"]\n'), port)


def litellm_proc(workdir: Path, stub: ServerProcess, exe: Path, quotas: bool = False) -> ServerProcess:
    """quotas: rpm and tpm on the deployment, enforced by LiteLLM's router in memory (its
    per-key limits need its Prisma/PostgreSQL database, whose engine downloads are out of
    reach here)."""
    port = free_port()
    limits = f"      rpm: {QUOTA_RPM}\n      tpm: {QUOTA_TPM}\n" if quotas else ""
    router = "router_settings:\n  routing_strategy: usage-based-routing-v2\n" if quotas else ""
    text = (f"model_list:\n  - model_name: {MODEL}\n    litellm_params:\n      model: openai/{MODEL}\n"
            f"      api_base: {stub.base}/v1\n      api_key: sk-dummy\n{limits}{router}"
            f"general_settings:\n  master_key: {API_KEY}\n")
    cfg = workdir / "litellm.yaml"
    cfg.write_text(text)
    # No network here: use the bundled model cost map instead of fetching it, and no telemetry.
    env: dict[str, str | None] = {"LITELLM_LOCAL_MODEL_COST_MAP": "True", "LITELLM_LOG": "ERROR",
                                  "LITELLM_TELEMETRY": "False", "DISABLE_SCHEMA_UPDATE": "True",
                                  "NO_DOCS": "True"}
    for k in ("DATABASE_URL", "LITELLM_MASTER_KEY", "REDIS_HOST", "REDIS_URL", "LITELLM_LICENSE"):
        env[k] = None
    return server_proc("litellm", [str(exe), "--config", str(cfg), "--host", "127.0.0.1", "--port", str(port),
                            "--num_workers", "1"], port, "/health/liveliness", env=env, config_text=text)


def litellm_version(exe: Path) -> str | None:
    py = exe.parent / "python"
    try:
        out = subprocess.run([str(py), "-c", "import importlib.metadata as m; print(m.version('litellm'))"],
                             capture_output=True, text=True, timeout=60)
        return out.stdout.strip() or out.stderr.strip()[-300:]
    except (OSError, subprocess.TimeoutExpired) as exc:
        return f"unknown ({exc})"


# ---------------------------------------------------------------------------------------
# load


@dataclass
class Sample:
    ok: bool
    total: float
    ttft: float | None = None
    error: str | None = None
    usage: bool = False


def request_body(api: str, stream: bool) -> tuple[str, dict]:
    body: dict = {"model": MODEL, "max_tokens": 16, "temperature": 0}
    if api == "chat":
        path, body["messages"] = "/chat/completions", [{"role": "user", "content": PROMPT}]
    else:
        path, body["prompt"] = "/completions", PROMPT
    if stream:
        body["stream"] = True
        body["stream_options"] = {"include_usage": True}
    return path, body


def _text(choice: dict) -> str:
    """A non-streamed choice's text (streamed ones: common.stream)."""
    if "message" in choice:
        return (choice.get("message") or {}).get("content") or ""
    return choice.get("text") or ""


async def one(client: httpx.AsyncClient, url: str, body: dict) -> Sample:
    t0 = time.perf_counter()
    try:
        if not body.get("stream"):
            resp = await client.post(url, json=body)
            total = time.perf_counter() - t0
            if resp.status_code != 200:
                return Sample(False, total, error=f"HTTP {resp.status_code}: {resp.text[:200]}")
            data = resp.json()
            text = "".join(_text(c) for c in data.get("choices") or [])
            if text != ANSWER:
                return Sample(False, total, error=f"unexpected text {text!r}")
            return Sample(True, total, usage=bool(data.get("usage")))
        st = await common.stream(client, url, body)
        if not st.ok or st.text != ANSWER:
            return Sample(False, st.total or 0.0, st.ttft,
                          error=st.error or f"stream text {st.text!r}, [DONE] seen: {st.done}")
        return Sample(True, st.total or 0.0, st.ttft, usage=st.usage is not None)
    except (httpx.HTTPError, ValueError) as exc:
        return Sample(False, time.perf_counter() - t0, error=f"{type(exc).__name__}: {exc}"[:200])


async def sequential(client: httpx.AsyncClient, url: str, body: dict, n: int) -> list[Sample]:
    return [await one(client, url, body) for _ in range(n)]


async def concurrent(clients: list[httpx.AsyncClient], url: str, body: dict, concurrency: int, n: int,
                     cap_s: float) -> tuple[list[Sample], float]:
    """n requests (or fewer: none is started after cap_s) from `concurrency` workers; worker i
    sends through clients[i % len(clients)]."""
    samples: list[Sample] = []
    left = n
    t0 = time.perf_counter()
    deadline = t0 + cap_s

    async def worker(client: httpx.AsyncClient) -> None:
        nonlocal left
        while left > 0 and time.perf_counter() < deadline:
            left -= 1
            samples.append(await one(client, url, body))

    await asyncio.gather(*(worker(clients[i % len(clients)]) for i in range(concurrency)))
    return samples, time.perf_counter() - t0


@dataclass
class Plan:
    api: str
    latency_n: int
    load_n: int
    load_cap: float
    concurrency: int
    warm_n: int = 20
    clients: str = "per-worker"   # one pooled AsyncClient per worker, or "one" shared by all


def stub_stats(stub: ServerProcess) -> dict:
    with httpx.Client(timeout=5.0, trust_env=False) as c:
        return c.get(stub.base + "/stats").json()


async def measure(base: str, plan: Plan, stub: ServerProcess, gateway_pid: int | None) -> dict:
    """One target's turn: warm-up, then the four timed phases."""
    lim = httpx.Limits(max_connections=plan.concurrency * 2, max_keepalive_connections=plan.concurrency * 2)
    out: dict = {"phases": {}}
    errors: Counter[str] = Counter()
    paths0 = Counter(stub_stats(stub)["paths"])

    def new_client() -> httpx.AsyncClient:
        return httpx.AsyncClient(limits=lim, timeout=httpx.Timeout(30.0), trust_env=False,
                                 headers={"Authorization": f"Bearer {API_KEY}"})

    # httpx's pool scans every pooled connection on each request (has_expired -> a poll() per
    # idle connection): one client with 32 connections cost the generator 2-4x the CPU per
    # request of 32 single-connection clients. Both keep their connections alive.
    clients = [new_client() for _ in range(plan.concurrency if plan.clients == "per-worker" else 1)]
    async with contextlib.AsyncExitStack() as stack:
        for c in clients:
            await stack.enter_async_context(c)
        client = clients[0]
        path_n, body_n = request_body(plan.api, False)
        path_s, body_s = request_body(plan.api, True)
        url_n, url_s = base + path_n, base + path_s
        # warm-up: imports, first-request paths, and connection pools on both sides
        warm = await sequential(client, url_n, body_n, plan.warm_n)
        warm += await sequential(client, url_s, body_s, plan.warm_n)
        burst, _ = await concurrent(clients, url_n, body_n, plan.concurrency, 2 * plan.concurrency, 30.0)
        burst2, _ = await concurrent(clients, url_s, body_s, plan.concurrency, 2 * plan.concurrency, 30.0)
        bad = [s for s in warm + burst + burst2 if not s.ok]
        if len(bad) == len(warm + burst + burst2):
            raise RuntimeError(f"every warm-up request failed, e.g. {bad[0].error}")
        for s in bad:
            errors[f"warm-up: {s.error}"] += 1

        phases = [("latency", url_n, body_n, 1), ("ttft", url_s, body_s, 1),
                  ("load", url_n, body_n, plan.concurrency), ("load_stream", url_s, body_s, plan.concurrency)]
        for name, url, body, conc in phases:
            before = stub_stats(stub)
            cpu0 = tree_cpu(gateway_pid) if gateway_pid else None
            own0 = time.process_time()
            if conc == 1:
                t0 = time.perf_counter()
                samples = await sequential(client, url, body, plan.latency_n)
                wall = time.perf_counter() - t0
            else:
                samples, wall = await concurrent(clients, url, body, conc, plan.load_n, plan.load_cap)
            own1 = time.process_time()
            cpu1 = tree_cpu(gateway_pid) if gateway_pid else None
            after = stub_stats(stub)
            good = [s for s in samples if s.ok]
            for s in samples:
                if not s.ok:
                    errors[f"{name}: {s.error}"] += 1
            conns = after["connections"] - before["connections"]
            upstream = after["requests"] - before["requests"] - 1   # less our own /stats call
            ph = {
                "concurrency": conc, "requests": len(samples), "ok": len(good), "wall_s": wall,
                "p50": percentile([s.total for s in good], 0.5), "p90": percentile([s.total for s in good], 0.9),
                "rps": len(good) / wall if wall > 0 else None,
                "upstream_connections": conns,
                "connections_per_100": 100 * conns / len(samples) if samples else None,
                "upstream_requests_per_request": upstream / len(samples) if samples else None,
                "usage_seen": sum(s.usage for s in good),
            }
            if body.get("stream"):
                ph["ttft_p50"] = percentile([s.ttft for s in good if s.ttft is not None], 0.5)
                ph["ttft_p90"] = percentile([s.ttft for s in good if s.ttft is not None], 0.9)
            if cpu0 is not None and cpu1 is not None and samples:
                ph["gateway_cpu_ms_per_request"] = 1000 * (cpu1 - cpu0) / len(samples)
            if samples:
                ph["loadgen_cpu_ms_per_request"] = 1000 * (own1 - own0) / len(samples)
            out["phases"][name] = ph
            print(f"    {name:12} n={len(samples):5} ok={len(good):5} p50={_ms(ph['p50'])} ms"
                  + (f" ttft={_ms(ph.get('ttft_p50'))} ms" if body.get("stream") else "")
                  + f" {ph['rps']:8.1f} req/s  upstream conns +{conns}"
                  + (f"  cpu {ph['gateway_cpu_ms_per_request']:.2f} ms/req"
                     if "gateway_cpu_ms_per_request" in ph else "")
                  + f"  (generator {ph.get('loadgen_cpu_ms_per_request', 0):.2f})",
                  flush=True)
        paths = Counter(stub_stats(stub)["paths"])
        paths.subtract(paths0)
        out["upstream_paths"] = {k: v for k, v in paths.items() if v and k != "GET /stats"}
    out["errors"] = dict(errors)
    return out


def quota_report(record: dict, summary: dict) -> None:
    """Issue 12's targets: what shared Redis quotas add over memory quotas at c=32 (p50 of the
    non-streaming load phase, same round), and modelyard's throughput with quotas against
    LiteLLM's with its router's rpm/tpm."""
    rounds = record["rounds_data"]

    def load(r: dict, n: str, key: str):
        try:
            return r["targets"][n]["phases"]["load"][key]
        except KeyError:
            return None
    added = [_diff(load(r, "modelyard-redis", "p50"), load(r, "modelyard", "p50")) for r in rounds]
    med = _med([None if a is None else 1000 * a for a in added])
    target = QUOTA_TARGETS["redis_added_p50_ms"]
    met = None if med[0] is None else med[0] <= target
    summary["quotas"] = {"redis_added_p50_ms": {"median": med, "per_round": added, "target": f"<= {target}",
                                                "met": met}}
    print(f"\nquotas on (issue 12), c={record['concurrency']}, non-stream:")
    print(f"  Redis admission adds p50 {_fmt(med, 1, 3)} ms over memory quotas  target <= {target} ms  "
          f"{'MET' if met else 'MISSED' if met is not None else '?'}")
    if not record.get("litellm"):
        return
    for n in ("modelyard", "modelyard-redis"):
        each = [_ratio(load(r, n, "rps"), load(r, "litellm", "rps")) for r in rounds]
        ratio = _ratio(_med([load(r, n, "rps") for r in rounds])[0], _med([load(r, "litellm", "rps") for r in rounds])[0])
        target = QUOTA_TARGETS["rps_vs_litellm"]
        met = None if ratio is None else ratio >= target
        summary["quotas"][f"{n}_rps_vs_litellm"] = {"ratio": ratio, "per_round": each, "target": f">= {target}",
                                                     "met": met}
        got = [x for x in each if x is not None]
        print(f"  {n} / LiteLLM req/s {'-' if ratio is None else f'{ratio:.2f}x'} "
              f"(per round {min(got):.2f}-{max(got):.2f})  target >= {target}x  "
              f"{'MET' if met else 'MISSED' if met is not None else '?'}" if got else f"  {n} / LiteLLM: -")


# ---------------------------------------------------------------------------------------
# profile


def profile_modelyard(workdir: Path, stub: ServerProcess, plan: Plan, outdir: Path) -> dict:
    """An untimed modelyard turn whose load phases run under py-spy; top frames by own samples."""
    outdir.mkdir(parents=True, exist_ok=True)
    gw = gateway_proc(workdir, stub)
    start_server(gw, workdir, 60)
    result: dict = {}
    try:
        raw = outdir / "modelyard-load.txt"
        spy = subprocess.Popen([str(PY_SPY), "record", "--pid", str(gw.pid), "--rate", "250", "--format", "raw",
                                "--output", str(raw), "--nonblocking"],
                               stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        time.sleep(1.0)
        try:
            prof_plan = Plan(plan.api, 1, plan.load_n, plan.load_cap, plan.concurrency, warm_n=2, clients=plan.clients)
            asyncio.run(measure(gw.base + "/v1", prof_plan, stub, gw.pid))
        finally:
            spy.send_signal(signal.SIGINT)
            try:
                spy.wait(timeout=30)
            except subprocess.TimeoutExpired:
                spy.kill()
                spy.wait()
        if raw.exists():
            result = summarize_profile(raw)
            result["file"] = str(raw)
        else:
            result = {"error": (spy.stderr.read().decode(errors="replace") if spy.stderr else "")[-500:]}
    finally:
        gw.stop()
    return result


def summarize_profile(raw: Path, top: int = 20) -> dict:
    """Shares of py-spy's samples: by own frame, by modelyard frame (inclusive), and the share
    spent opening and closing upstream connections."""
    own: Counter[str] = Counter()
    ours: Counter[str] = Counter()
    total = idle = churn = 0
    for line in raw.read_text(errors="replace").splitlines():
        stack, _, count = line.rpartition(" ")
        if not count.isdigit():
            continue
        n = int(count)
        frames = [f for f in stack.split(";") if f]
        if not frames:
            continue
        total += n
        leaf = _frame(frames[-1])
        own[leaf] += n
        if leaf.startswith(("EpollSelector.select", "select ")):
            idle += n
        if any(k in f for f in frames for k in ("_real_close", "sock_connect", "create_connection")):
            churn += n
        for f in {_frame(f) for f in frames if "modelyard/" in f and "__main__" not in f and "cli.py" not in f}:
            ours[f] += n
    pc = (lambda n: round(100 * n / total, 1)) if total else (lambda n: 0.0)
    return {"samples": total, "idle_pct": pc(idle), "connect_close_pct": pc(churn),
            "own": [(f, pc(n)) for f, n in own.most_common(top)],
            "modelyard_inclusive": [(f, pc(n)) for f, n in ours.most_common(top)]}


def _frame(f: str) -> str:
    """'func (path/to/module.py:123)' -> 'func (module.py)'; py-spy's raw frames."""
    name, _, where = f.partition(" (")
    where = where.rstrip(")").rsplit(":", 1)[0]
    parts = where.split("/")
    short = "/".join(parts[-2:]) if len(parts) > 1 else where
    return f"{name} ({short})"


# ---------------------------------------------------------------------------------------
# report


def _ms(x: float | None) -> str:
    return "     -" if x is None else f"{1000 * x:6.2f}"


def _fmt(t: tuple[float | None, float | None, float | None], scale: float = 1.0, nd: int = 2) -> str:
    m, lo, hi = t
    if m is None:
        return "-"
    if lo == hi:
        return f"{m * scale:.{nd}f}"
    return f"{m * scale:.{nd}f} [{lo * scale:.{nd}f}-{hi * scale:.{nd}f}]"


def per_round(r: dict, name: str) -> dict:
    """The derived figures of one round for one gateway (None where missing)."""
    t = r.get("targets", {})
    g, d = t.get(name, {}).get("phases"), t.get("direct", {}).get("phases")
    if not g:
        return {}
    f: dict = {
        "latency_p50": g["latency"]["p50"], "ttft_p50": g["ttft"]["ttft_p50"],
        "rps_nonstream": g["load"]["rps"], "rps_stream": g["load_stream"]["rps"],
        "conns_per_100": (g["latency"]["upstream_connections"] + g["ttft"]["upstream_connections"]
                          + g["load"]["upstream_connections"] + g["load_stream"]["upstream_connections"])
        * 100 / max(1, sum(g[p]["requests"] for p in ("latency", "ttft", "load", "load_stream"))),
        "conns_per_100_load": (g["load"]["upstream_connections"] + g["load_stream"]["upstream_connections"])
        * 100 / max(1, g["load"]["requests"] + g["load_stream"]["requests"]),
        "cpu_ms_nonstream": g["load"].get("gateway_cpu_ms_per_request"),
        "cpu_ms_stream": g["load_stream"].get("gateway_cpu_ms_per_request"),
    }
    if d:
        f["added_latency"] = _diff(g["latency"]["p50"], d["latency"]["p50"])
        f["added_ttft"] = _diff(g["ttft"]["ttft_p50"], d["ttft"]["ttft_p50"])
    return f


def _diff(a: float | None, b: float | None) -> float | None:
    return a - b if a is not None and b is not None else None


def report(record: dict) -> dict:
    rounds = record["rounds_data"]
    names = ["direct", "modelyard"] + (["modelyard-redis"] if record.get("quotas") else []) + \
        (["litellm"] if record.get("litellm") else [])
    rows = [("non-stream p50, c=1 (ms)", lambda r, n: r["targets"][n]["phases"]["latency"]["p50"], 1000),
            ("  added vs direct (ms)", lambda r, n: per_round(r, n).get("added_latency"), 1000),
            ("stream TTFT p50, c=1 (ms)", lambda r, n: r["targets"][n]["phases"]["ttft"]["ttft_p50"], 1000),
            ("  added vs direct (ms)", lambda r, n: per_round(r, n).get("added_ttft"), 1000),
            (f"non-stream req/s, c={record['concurrency']}", lambda r, n: r["targets"][n]["phases"]["load"]["rps"], 1),
            (f"stream req/s, c={record['concurrency']}",
             lambda r, n: r["targets"][n]["phases"]["load_stream"]["rps"], 1),
            ("gateway CPU ms/req, non-stream", lambda r, n: per_round(r, n).get("cpu_ms_nonstream"), 1),
            ("gateway CPU ms/req, stream", lambda r, n: per_round(r, n).get("cpu_ms_stream"), 1),
            ("generator CPU ms/req, non-stream", lambda r, n: r["targets"][n]["phases"]["load"]
             .get("loadgen_cpu_ms_per_request"), 1),
            ("generator CPU ms/req, stream", lambda r, n: r["targets"][n]["phases"]["load_stream"]
             .get("loadgen_cpu_ms_per_request"), 1),
            ("upstream conns /100 req (timed)", lambda r, n: per_round(r, n).get("conns_per_100"), 1),
            ("upstream requests per request", lambda r, n: r["targets"][n]["phases"]["load"]
             ["upstream_requests_per_request"], 1)]

    def values(fn, name):
        out = []
        for r in rounds:
            try:
                out.append(fn(r, name) if name in r.get("targets", {}) and "phases" in r["targets"][name] else None)
            except (KeyError, TypeError):
                out.append(None)
        return out

    summary: dict = {"table": {}, "ratios": {}}
    width = 34
    print(f"\n{'median [min-max] over ' + str(len(rounds)) + ' round(s)':{width}}" + "".join(f"{n:>26}" for n in names))
    for label, fn, scale in rows:
        cells = []
        for n in names:
            if n == "direct" and label.strip().startswith(("added", "gateway CPU")):
                cells.append("")
                continue
            t = _med(values(fn, n))
            summary["table"].setdefault(label.strip(), {})[n] = t
            nd = 2 if scale == 1000 or "CPU" in label else 1
            cells.append(_fmt(t, scale, nd))
        print(f"{label:{width}}" + "".join(f"{c:>26}" for c in cells))

    if record.get("quotas"):
        quota_report(record, summary)
    if "litellm" not in names or not any(per_round(r, "litellm") for r in rounds):
        return summary
    print("\nmodelyard / LiteLLM (ratio of the medians; each round's own ratio after it), "
          "against issue 4's targets:")
    checks = [("added_latency", "added non-stream latency p50", "<=", TARGETS["added_latency"]),
              ("added_ttft", "added streaming TTFT p50", "<=", TARGETS["added_ttft"]),
              ("rps_nonstream", "throughput, non-stream", ">=", TARGETS["rps_nonstream"]),
              ("rps_stream", "throughput, stream", ">=", TARGETS["rps_stream"])]
    for key, label, op, target in checks:
        mine = [per_round(r, "modelyard").get(key) for r in rounds]
        peer = [per_round(r, "litellm").get(key) for r in rounds]
        ratio = _ratio(_med(mine)[0], _med(peer)[0])
        each = [_ratio(a, b) for a, b in zip(mine, peer)]
        met = None if ratio is None else (ratio <= target if op == "<=" else ratio >= target)
        summary["ratios"][key] = {"ratio": ratio, "per_round": each, "target": f"{op} {target}", "met": met}
        got = [x for x in each if x is not None]
        spread = f"per round {min(got):.3f}-{max(got):.3f}" if got else "per round -"
        print(f"  {label:32} {'-' if ratio is None else f'{ratio:.3f}x':>9} "
              f"({spread})  target {op} {target}x  "
              f"{'MET' if met else 'not met' if met is not None else '?'}")
    # pooled: after warm-up a pooling gateway needs no new upstream connection
    pooled = {}
    for n in ("modelyard", "litellm"):
        per100 = _med([per_round(r, n).get("conns_per_100") for r in rounds])[0]
        pooled[n] = {"conns_per_100": per100, "pooled": per100 is not None and per100 < 10.0}
    summary["ratios"]["pooled"] = pooled

    def says(n: str) -> str:
        c = pooled[n]["conns_per_100"]
        if c is None:
            return "-"
        return f"{c:.1f} new/100 req ({'pooled' if c < 10 else 'partly pooled' if c < 90 else 'NOT pooled'})"
    print(f"  {'upstream connections':32} modelyard {says('modelyard')}, LiteLLM {says('litellm')}"
          f"  target: modelyard pooled  {'MET' if pooled['modelyard']['pooled'] else 'not met'}")
    return summary


# ---------------------------------------------------------------------------------------




def run_turn(name: str, proc: ServerProcess | None, base: str, plan: Plan, stub: ServerProcess, workdir: Path,
             start_timeout: float) -> dict:
    res: dict = {"loadavg": os.getloadavg()[0]}
    print(f"  {name} (load average {res['loadavg']:.2f})", flush=True)
    try:
        if proc is not None:
            res["start_s"] = start_server(proc, workdir, start_timeout)
            res["command"] = " ".join(proc.argv)
            res["config"] = (proc.config_text or "").replace(API_KEY, "<random per-run key>")
            base = proc.base
        res.update(asyncio.run(measure(base + "/v1", plan, stub, proc.pid if proc else None)))
        if res.get("errors"):
            print(f"    errors: {res['errors']}", flush=True)
    except Exception as exc:  # noqa: BLE001 - one failed turn must not lose the others
        res["error"] = f"{type(exc).__name__}: {exc}"
        print(f"    FAILED: {res['error']}", flush=True)
    finally:
        if proc is not None:
            proc.stop()
    return res


def main(argv: list[str] | None = None) -> int:
    p = parser(__doc__, rounds=2, rounds_help="A/B rounds (direct, modelyard, LiteLLM each round)",
               json_help="write the raw numbers here")
    p.add_argument("--quick", action="store_true", help="smoke run: 1 round, few requests")
    p.add_argument("--api", choices=["completions", "chat"], default="completions")
    p.add_argument("--concurrency", type=int, default=32)
    p.add_argument("--latency-requests", type=int, default=None, help="requests per c=1 phase (default 300)")
    p.add_argument("--load-requests", type=int, default=None, help="requests per load phase (default 1000)")
    p.add_argument("--load-cap", type=float, default=None, help="seconds per load phase (default 20)")
    p.add_argument("--clients", choices=["one", "per-worker"], default="per-worker",
                   help="load generator: one pooled AsyncClient per worker (default) or one shared")
    p.add_argument("--chunk-delay-ms", type=float, default=0.0, help="stub's delay between streamed chunks")
    p.add_argument("--litellm", type=Path, default=LITELLM, help="the litellm executable (its own venv)")
    p.add_argument("--no-litellm", action="store_true", help="modelyard vs direct only")
    p.add_argument("--profile", type=Path, help="also profile modelyard's load phases with py-spy into DIR")
    p.add_argument("--quotas", action="store_true",
                   help="issue 12: modelyard with memory and with Redis per-key quotas, LiteLLM with router rpm/tpm")
    a = p.parse_args(argv)

    rounds = 1 if a.quick and a.rounds == 2 else a.rounds
    plan = Plan(a.api, a.latency_requests or (40 if a.quick else 300), a.load_requests or (200 if a.quick else 1000),
                a.load_cap or (8.0 if a.quick else 20.0), a.concurrency, warm_n=10 if a.quick else 20,
                clients=a.clients)
    use_litellm = not a.no_litellm
    record: dict = {
        "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "argv": sys.argv, "cpu": cpu_model(), "nproc": os.cpu_count(), "python": platform.python_version(),
        "httpx": httpx.__version__, "api": a.api, "rounds": rounds, "concurrency": a.concurrency,
        "latency_requests": plan.latency_n, "load_requests": plan.load_n, "load_cap_s": plan.load_cap,
        "chunk_delay_ms": a.chunk_delay_ms, "clients": a.clients, "loadavg_start": os.getloadavg(), "rounds_data": [],
        "quotas": a.quotas,
    }
    if use_litellm:
        if not a.litellm.exists():
            print(f"LiteLLM not found at {a.litellm}: measuring modelyard vs direct only "
                  f"(install: python3 -m venv {PEERS / 'litellm-venv'} && "
                  f"{PEERS / 'litellm-venv/bin/pip'} install 'litellm[proxy]==1.106.12')", flush=True)
            record["litellm_missing"] = str(a.litellm)
            use_litellm = False
        else:
            record["litellm"] = litellm_version(a.litellm)
            print(f"LiteLLM {record['litellm']} ({a.litellm})", flush=True)

    with tempfile.TemporaryDirectory(prefix="modelyard-proxy-bench-") as tmp, \
            (redis_server() if a.quotas else contextlib.nullcontext((None, None))) as (redis_url, _):
        workdir = Path(tmp)
        stub = stub_proc(a.chunk_delay_ms)
        start_server(stub, workdir, 30)
        record["stub"] = " ".join(stub.argv)
        try:
            for rnd in range(rounds):
                print(f"round {rnd + 1}/{rounds}", flush=True)
                r: dict = {"targets": {}}
                r["targets"]["direct"] = run_turn("direct", None, stub.base, plan, stub, workdir, 0)
                quota = "memory" if a.quotas else None
                r["targets"]["modelyard"] = run_turn("modelyard", gateway_proc(workdir, stub, quota), "", plan, stub,
                                                     workdir, 60)
                if a.quotas:
                    r["targets"]["modelyard-redis"] = run_turn(
                        "modelyard-redis", gateway_proc(workdir, stub, "redis", redis_url), "", plan, stub, workdir, 60)
                if use_litellm:
                    r["targets"]["litellm"] = run_turn("litellm", litellm_proc(workdir, stub, a.litellm, a.quotas), "",
                                                       plan, stub, workdir, 240)
                record["rounds_data"].append(r)
                if a.json:   # keep what we have, in case a later round dies
                    write_record(a.json, record)
            if a.profile:
                print("profile: modelyard load phases under py-spy (untimed)", flush=True)
                try:
                    record["profile"] = profile_modelyard(workdir, stub, plan, a.profile)
                except Exception as exc:  # noqa: BLE001 - the measured rounds stand without it
                    record["profile"] = {"error": f"{type(exc).__name__}: {exc}"}
                    print(f"  profile failed: {record['profile']['error']}", flush=True)
        finally:
            stub.stop()
        record["loadavg_end"] = os.getloadavg()
        record["summary"] = report(record)
    if "profile" in record and "own" in record["profile"]:
        prof = record["profile"]
        print(f"\nmodelyard under load, py-spy: {prof['samples']} samples ({prof['file']}); "
              f"{prof['idle_pct']}% waiting in select, {prof['connect_close_pct']}% opening/closing upstream "
              "connections. Top frames by own samples:")
        for f, pcent in prof["own"][:12]:
            print(f"  {pcent:5.1f}%  {f}")
        print("modelyard frames, inclusive:")
        for f, pcent in prof["modelyard_inclusive"][:12]:
            print(f"  {pcent:5.1f}%  {f}")
    first = record["rounds_data"][0]["targets"] if record["rounds_data"] else {}
    print("\ncommands:")
    print(f"  stub: {record['stub']}")
    for n in ("modelyard", "litellm"):
        if first.get(n, {}).get("command"):
            print(f"  {n}: {first[n]['command']} (started in {first[n]['start_s']:.1f}s)")
            print("    config: " + first[n]["config"].strip().replace("\n", " | "))
    for n, t in first.items():
        if t.get("upstream_paths"):
            print(f"  upstream requests during {n}'s turn (round 1): {t['upstream_paths']}")
    print(f"load average: {record['loadavg_start'][0]:.2f} at start, {record['loadavg_end'][0]:.2f} at end "
          f"({record['nproc']} cores: {record['cpu']})")
    if a.json:
        write_record(a.json, record)
        print(f"raw numbers: {a.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
