"""Models that come and go (issue 24): three store models as on-demand endpoints under a memory
budget that holds two of them, and a request mix that rotates among them.

    python bench/lifecycle.py [--requests 60] [--threads 2] [--seed 1] [--smoke] [--json PATH]

Server: smollm2-135m, gemma3-270m (completions) and minilm-l6-v2 (embeddings), each
`load = "on_demand"`, context 512, parallel 2, batch 64, prefix_cache_mib 0; `memory_budget_mib`
= the two largest needs (read from the GGUFs by modelyard.local.footprint, as the server does)
plus 2 %: any two fit, never three. The mix: --requests requests, one at a time, each to the
model of the last request with probability 1/2, else to one of the other two (seeded): about half
find their model loaded. Completions stream 16 tokens; embeddings embed one sentence.

Figures:
- cold start: time to the first token (embeddings: to the answer) of requests whose model was not
  loaded, against that model's load time (`modelyard_endpoint_load_seconds_total`'s step): what a
  load adds, and what is the request's own;
- warm: the same for requests whose model was loaded, beside a plain server's (the same endpoint,
  `load = "always"`, running beside it; each warm request paired with one there, just before or
  after it) time to first token: target, unchanged;
- hit rate: requests whose model was loaded when they arrived;
- RSS over the run (VmRSS sampled every 0.1 s) against the budget, above the process's own RSS
  with nothing loaded (its overhead: Python, FastAPI, llama.cpp's library); target, the peak
  above that overhead never past the budget;
- evictions, loads, and failed requests (target: none; a model is always evictable here).

--smoke: 12 requests (checks the script, not the machine). Figures from a busy machine are not
the project's: the lead reruns them quiet.
"""

from __future__ import annotations

import asyncio
import random
import sys
import tempfile
import threading
import time
from pathlib import Path

import httpx
from prometheus_client.parser import text_string_to_metric_families

from common import (ServerProcess, free_port, machine_line, modelyard_proc, parser, percentile, start_server, stream,
                    write_record)

from modelyard.local.footprint import estimate
from modelyard.settings import EndpointSpec

MODELS = {"smol": ("smollm2-135m", False), "gemma": ("gemma3-270m", False), "minilm": ("minilm-l6-v2", True)}
PROMPT = "Write one sentence about the sea:"


def shape(threads: int) -> str:
    return f"context = 512\nparallel = 2\nbatch = 64\nthreads = {threads}\nprefix_cache_mib = 0\n"


def needs(store: Path, threads: int) -> dict[str, int]:
    out = {}
    for name, (model, embeddings) in MODELS.items():
        spec = EndpointSpec(name=name, model=model, context=512, parallel=2, batch=64, threads=threads,
                            prefix_cache_mib=0)
        out[name] = estimate(store / "models" / f"{model}.gguf", spec, embeddings).total
    return out


def config(budget_mib: int, threads: int, load: str = "on_demand", names=tuple(MODELS)) -> str:
    out = f"[server]\nmemory_budget_mib = {budget_mib}\nload_timeout = 300\n" if budget_mib else "[server]\n"
    for name in names:
        out += f'\n[[endpoints]]\nname = "{name}"\nmodel = "{MODELS[name][0]}"\nload = "{load}"\n{shape(threads)}'
    return out


def rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return 0.0


class RssSampler:
    def __init__(self, pid: int) -> None:
        self.pid, self.samples, self._stop = pid, [], threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        t0 = time.perf_counter()
        while not self._stop.wait(0.1):
            try:
                self.samples.append((round(time.perf_counter() - t0, 2), round(rss_mib(self.pid), 1)))
            except OSError:
                return

    def stop(self) -> None:
        self._stop.set()
        self.thread.join(5)


def counters(base: str, name: str) -> dict[str, float]:
    text = httpx.get(base + "/metrics", timeout=10, trust_env=False).text
    return {s.labels["endpoint"]: s.value for f in text_string_to_metric_families(text) for s in f.samples
            if s.name == name}


def is_loaded(base: str, name: str) -> bool:
    return httpx.get(f"{base}/api/v1/endpoints/{name}", timeout=10, trust_env=False).json()["loaded"]


async def one(client: httpx.AsyncClient, base: str, name: str) -> tuple[bool, float | None]:
    """(ok, seconds to the first token or, embeddings, to the answer)."""
    if MODELS[name][1]:
        t0 = time.perf_counter()
        r = await client.post(base + "/v1/embeddings", json={"model": name, "input": PROMPT})
        return r.status_code == 200, time.perf_counter() - t0
    s = await stream(client, base + "/v1/completions", {"model": name, "prompt": PROMPT, "max_tokens": 16,
                                                      "temperature": 0})
    return s.ok, s.ttft


def plan(n: int, seed: int) -> list[str]:
    rng, names, out = random.Random(seed), list(MODELS), []
    for _ in range(n):
        if out and rng.random() < 0.5:
            out.append(out[-1])
        else:
            out.append(rng.choice([m for m in names if not out or m != out[-1]]))
    return out


def start_plain(workdir: Path, threads: int) -> ServerProcess:
    """A plain server (both completions models loaded at start), running beside the lifecycle
    server for the whole run: each warm request there is paired with the same request here, just
    before or just after it (alternately), so the two figures share the machine's minute."""
    srv = modelyard_proc(workdir, config(0, threads, "always", ("smol", "gemma")), free_port(), name="plain")
    start_server(srv, workdir, timeout=300)
    return srv


async def main() -> int:
    p = parser(__doc__.split("\n\n")[0])
    p.add_argument("--requests", type=int, default=60)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--smoke", action="store_true")
    args = p.parse_args()
    n = 12 if args.smoke else args.requests
    store = Path.home() / ".cache" / "modelyard"
    need = needs(store, args.threads)
    top_two = sorted(need.values())[-2:]
    budget_mib = int(sum(top_two) * 1.02 / 2**20) + 1
    workdir = Path(tempfile.mkdtemp(prefix="bench-lifecycle-"))
    print(machine_line())
    print(f"needs (MiB, from the GGUFs): " + ", ".join(f"{k} {v / 2**20:.1f}" for k, v in need.items())
          + f"; budget {budget_mib} MiB (any two, not three)")
    plain_srv = start_plain(workdir, args.threads)
    paired: dict[str, list[float]] = {"smol": [], "gemma": []}
    srv = modelyard_proc(workdir, config(budget_mib, args.threads), free_port(), name="lifecycle")
    rows: list[dict] = []
    try:
        start_server(srv, workdir, timeout=300)
        async with httpx.AsyncClient(timeout=600, trust_env=False) as client:
            for name in paired:         # its first request is not a warm one
                await one(client, plain_srv.base, name)
        time.sleep(1.0)
        overhead = rss_mib(srv.pid)         # nothing loaded yet: the process's own
        sampler = RssSampler(srv.pid)
        async with httpx.AsyncClient(timeout=600, trust_env=False) as client:
            for name in plan(n, args.seed):
                hit = is_loaded(srv.base, name)
                pair = hit and name in paired
                if pair and len(rows) % 2:
                    paired[name].append((await one(client, plain_srv.base, name))[1])
                before = counters(srv.base, "modelyard_endpoint_load_seconds_total").get(name, 0.0)
                ok, first = await one(client, srv.base, name)
                load = counters(srv.base, "modelyard_endpoint_load_seconds_total").get(name, 0.0) - before
                if pair and not len(rows) % 2:
                    paired[name].append((await one(client, plain_srv.base, name))[1])
                rows.append({"model": name, "hit": hit, "ok": ok, "first_s": first, "load_s": round(load, 4),
                             "after": rows[-1]["model"] if rows else None})
        sampler.stop()
        evictions = counters(srv.base, "modelyard_endpoint_evictions_total")
        loads = counters(srv.base, "modelyard_endpoint_loads_total")
    finally:
        srv.stop()
        plain_srv.stop()
    plain = {name: percentile([t for t in times if t is not None], 0.5) for name, times in paired.items()}

    peak = max((r for _, r in sampler.samples), default=0.0)
    print(f"\n{'model':8} {'warm p50 ms':>12} {'plain p50 ms':>13} {'cold p50 ms':>12} {'load p50 ms':>12} "
          f"{'cold - load':>12} {'requests':>9} {'hits':>5}")
    summary = {}

    def ms(x):
        return f"{x * 1000:.0f}" if x is not None else "-"
    for name in MODELS:
        mine = [r for r in rows if r["model"] == name and r["ok"]]
        warm = percentile([r["first_s"] for r in mine if r["hit"] and r["first_s"] is not None], 0.5)
        cold_rows = [r for r in mine if not r["hit"] and r["first_s"] is not None]
        cold = percentile([r["first_s"] for r in cold_rows], 0.5)
        load = percentile([r["load_s"] for r in cold_rows if r["load_s"] > 0], 0.5)
        summary[name] = {"warm_p50_s": warm, "plain_p50_s": plain.get(name), "cold_p50_s": cold,
                         "load_p50_s": load, "requests": len([r for r in rows if r["model"] == name]),
                         "hits": len([r for r in mine if r["hit"]])}
        print(f"{name:8} {ms(warm):>12} {ms(plain.get(name)):>13} {ms(cold):>12} {ms(load):>12} "
              f"{ms(cold - load if cold is not None and load is not None else None):>12} "
              f"{summary[name]['requests']:>9} {summary[name]['hits']:>5}")
    # A warm request right after another model's pays for the switch on the same cores (the
    # other model's weights pushed this one's out of the CPU's caches); one after its own model's
    # is what a plain server sees.
    print("\nwarm TTFT p50 by the request before it:")
    for name in ("smol", "gemma"):
        warm = [r for r in rows if r["model"] == name and r["ok"] and r["hit"] and r["first_s"] is not None]
        same = percentile([r["first_s"] for r in warm if r["after"] == name], 0.5)
        other = percentile([r["first_s"] for r in warm if r["after"] != name], 0.5)
        summary[name].update(warm_same_model_p50_s=same, warm_after_switch_p50_s=other)
        print(f"  {name:8} same model {ms(same):>5} ms ({sum(r['after'] == name for r in warm)}), after another "
              f"model {ms(other):>5} ms ({sum(r['after'] != name for r in warm)}); plain server {ms(plain.get(name))} ms")
    failed = [r for r in rows if not r["ok"]]
    hits = sum(r["hit"] for r in rows)
    above = peak - overhead
    print(f"\nhit rate {hits}/{len(rows)} = {hits / len(rows):.0%}; loads {sum(loads.values()):.0f}; evictions "
          f"{sum(evictions.values()):.0f} ({', '.join(f'{k} {v:.0f}' for k, v in evictions.items())}); "
          f"failed requests {len(failed)} (target 0: {'MET' if not failed else 'MISSED'})")
    print(f"RSS: {overhead:.0f} MiB with nothing loaded (the process's overhead); peak {peak:.0f} MiB, "
          f"{above:.0f} MiB above it, budget {budget_mib} MiB (target: never above: "
          f"{'MET' if above <= budget_mib else 'MISSED'})")
    print("figures from this run only; a busy machine's are not the project's")
    write_record(args.json, {"machine": machine_line(), "needs_bytes": need, "budget_mib": budget_mib,
                             "overhead_rss_mib": overhead, "peak_rss_mib": peak, "rss": sampler.samples,
                             "rows": rows, "summary": summary, "plain": plain, "evictions": evictions,
                             "loads": loads, "failed": len(failed)})
    return 0 if not failed else 1


if __name__ == "__main__":
    sys.exit(asyncio.run(main()))
