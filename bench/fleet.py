"""A fleet: three engine replicas on loopback, two modelyard gateways in front, a workload with the
reuse real users produce, routed by `balance = "prefix"` and by `"least_in_flight"`, interleaved,
same seed; and the limit: each conversation pinned to one replica (no router).

Replicas (--replicas): three llama-server (the default when scripts/bench-peers built
~/.cache/modelyard/peers/llama-server) or three `modelyard serve`, of the store's smollm2-135m
GGUF, threads 1, parallel 2, a 2048-token context per slot, on loopback. Gateways: two per policy
(four in all, each pair routing over the same three replicas, `upstream_server` naming the
replicas' kind), requests alternating between the pair.

Workload (from --seed): --conversations multi-turn conversations over a long document (each turn
resends the history, turns alternate gateways), --groups groups of --group-size requests sharing
a long system prompt, --unique one-shot prompts; all started at once, each conversation's turns in
order. Every run tags its texts with the run's number so no run reuses another's cache, and the
texts are otherwise the same.

Per run: prompt tokens the replicas computed, TTFT p50/p99 at the client, throughput
(requests/s), each replica's share of requests (fair share: 1/3; the gateways'
modelyard_replica_requests_total, the client's own tally when pinned), failures. Computed tokens
come from the replicas' own metrics: modelyard's modelyard_prompt_tokens_total less its
prefix_reused_tokens; llama-server's `llamacpp:prompt_tokens_total` (--metrics), which counts
processed tokens only. Checked on the real binary (2026-12-07): the same 44-token chat twice gave
prompt_tokens_total 44 then 45 (timings prompt_n 44, then 1 with cache_n 43), and
`llamacpp:prompt_tokens_cached_total` 0 then 43: reused tokens are counted apart, as cache_n.

--kill: in each routed run (not pinned: nothing fails over there), once half the requests have
answered, one replica (the round's number mod 3) is SIGKILLed by its PID; reported are the requests
lost (failed at the client: before the first byte, an HTTP error; or mid-stream) and the seconds
from the kill until both gateways' /metrics show `modelyard_replica_healthy` 0 for it, against the
probe interval (proxy/replicas.HEALTH_INTERVAL). Its computed tokens are read just before the kill
(what it computed after that read is not counted). It is started again on the same port after the
run, and the next run waits until every gateway sees it healthy. The gateways retry a request on
another replica only after a connect error (proxy/replicas.CONNECT_ERRORS): in the smoke runs of
2026-12-07 (both kinds) requests already sent to the killed replica came back 502 before their
first byte ("Server disconnected without sending a response"), and one sent afterwards on a pooled
keep-alive connection got "connection reset by peer" as a 502 too, not a failover. Figures on a
busy machine are indicative only.

    python bench/fleet.py --rounds 1 --json fleet.json
    python bench/fleet.py --replicas modelyard --kill
"""

from __future__ import annotations

import asyncio
import os
import random
import re
import sys
import tempfile
import time
from pathlib import Path

import httpx

from common import (free_port, median_spread, modelyard_proc, parser, percentile, server_proc, start_server, stream,
                    write_record)
from modelyard.proxy.replicas import HEALTH_INTERVAL

MODEL = "smollm2-135m"
REPLICAS = 3
PARALLEL = 2
CONTEXT = 2048              # per slot: the longest conversation's last turn fits
LLAMA_SERVER = Path.home() / ".cache" / "modelyard" / "peers" / "llama-server"
GGUF = Path.home() / ".cache" / "modelyard" / "models" / f"{MODEL}.gguf"
WORDS = ("river mountain ledger harbor signal copper lantern orchard meadow canyon violet engine quarry "
         "festival compass glacier tavern summit willow beacon cathedral market prairie falcon").split()


def text(rng: random.Random, chars: int) -> str:
    out = []
    while sum(len(w) + 1 for w in out) < chars:
        out.append(rng.choice(WORDS))
    return " ".join(out)


def workload(seed: int, conversations: int, turns: int, groups: int, group_size: int, unique: int,
             doc_chars: int = 1200) -> dict:
    rng = random.Random(seed)
    return {
        "conversations": [{"doc": text(rng, doc_chars), "questions": [text(rng, 80) for _ in range(turns)]}
                          for _ in range(conversations)],
        "groups": [{"system": text(rng, 1400), "questions": [text(rng, 80) for _ in range(group_size)]}
                   for _ in range(groups)],
        "unique": [text(rng, 600) for _ in range(unique)],
    }


def replica_config() -> str:
    return (f'[server]\npublic_cache_counters = true\nlog_level = "warning"\n\n[[endpoints]]\nname = "{MODEL}"\n'
            f'model = "{MODEL}"\ncontext = {CONTEXT}\nparallel = {PARALLEL}\nthreads = 1\n')


def replica_proc(kind: str, workdir: Path, i: int):
    """One replica, not started: llama-server on the store's GGUF (-c is the total: per slot x
    slots), or `modelyard serve`."""
    port = free_port()
    if kind == "llama-server":
        return server_proc(f"replica-{i}", [str(LLAMA_SERVER), "-m", str(GGUF), "--metrics", "-t", "1",
                                            "--parallel", str(PARALLEL), "-c", str(PARALLEL * CONTEXT),
                                            "--host", "127.0.0.1", "--port", str(port)], port, "/health")
    return modelyard_proc(workdir, replica_config(), port, name=f"replica-{i}")


def gateway_config(urls: list[str], balance: str, abs_threshold: float, rel_threshold: float,
                   upstream_server: str = "modelyard") -> str:
    listed = ", ".join(f'"{u}"' for u in urls)
    return (f'[server]\nlog_level = "warning"\npublic_cache_counters = true\n\n'
            f'[[endpoints]]\nname = "fleet"\nengine = "openai"\n'
            f'urls = [{listed}]\nupstream_model = "{MODEL}"\nupstream_server = "{upstream_server}"\n'
            f'balance = "{balance}"\n'
            f'balance_abs_threshold = {abs_threshold}\nbalance_rel_threshold = {rel_threshold}\n')


def routed(client: httpx.Client, bases: list[str]) -> dict:
    """The gateways' routing counters, summed over gateways and replicas, and the requests they
    sent to each replica."""
    out: dict = {"overload_spills": 0.0, "prefix_hit_blocks": 0.0, "sent": [0.0] * REPLICAS}
    for base in bases:
        metrics = client.get(base.split("/api/")[0] + "/metrics").text
        for key in ("overload_spills", "prefix_hit_blocks"):
            out[key] += sum(float(v) for v in re.findall(rf'^modelyard_replica_{key}_total{{[^}}]*}} (\S+)$',
                                                          metrics, re.MULTILINE))
        for i, v in re.findall(r'^modelyard_replica_requests_total\{endpoint="fleet",replica="(\d+)"\} (\S+)$',
                               metrics, re.MULTILINE):
            out["sent"][int(i)] += float(v)
    return out


def healthy(metrics: str, replica: int) -> bool | None:
    m = re.search(rf'^modelyard_replica_healthy{{endpoint="fleet",replica="{replica}"}} (\S+)$', metrics, re.MULTILINE)
    return None if m is None else float(m.group(1)) == 1.0


def wait_healthy(client: httpx.Client, bases: list[str], replica: int, timeout: float = 60.0) -> None:
    """Until every gateway's /metrics shows `replica` healthy (a restarted one), bounded."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if all(healthy(client.get(b.split("/api/")[0] + "/metrics").text, replica) for b in bases):
            return
        time.sleep(0.1)
    raise SystemExit(f"replica {replica} not healthy on every gateway within {timeout:.0f}s")


def counters(client: httpx.Client, base: str, kind: str) -> dict:
    """A replica's prompt tokens computed: llama-server's prompt_tokens_total counts processed ones
    only; modelyard's counts all, less what its prefix cache reused."""
    metrics = client.get(base + "/metrics").text
    if kind == "llama-server":
        m = re.search(r'^llamacpp:prompt_tokens_total (\S+)$', metrics, re.MULTILINE)
        return {"computed": float(m.group(1)) if m else 0.0}
    prompt = sum(float(v) for v in re.findall(rf'^modelyard_prompt_tokens_total{{endpoint="{MODEL}"}} (\S+)$',
                                              metrics, re.MULTILINE))
    status = client.get(f"{base}/api/v1/endpoints/{MODEL}").json()
    return {"computed": prompt - float(status.get("prefix_reused_tokens", 0))}


async def run(bases: list[str], work: dict, tag: str, *, pinned: list[str] | None = None,
              victim=None) -> dict:
    """One run of the workload through `bases` (gateway API bases, alternated), or, `pinned`,
    each conversation/group to one replica directly. `victim` (index, its ServerProcess, a
    callable reading its counters): SIGKILLed once half the requests have answered."""
    results: list = []
    total = (sum(len(c["questions"]) for c in work["conversations"])
             + sum(len(g["questions"]) for g in work["groups"]) + len(work["unique"]))
    tally = [0] * REPLICAS
    killed: dict = {}
    async with httpx.AsyncClient(timeout=600, trust_env=False) as client:
        def target(i: int, home: int) -> tuple[str, str]:
            if pinned is not None:
                tally[home % len(pinned)] += 1
                return pinned[home % len(pinned)] + "/v1/chat/completions", MODEL
            return bases[i % len(bases)] + "/chat/completions", "fleet"

        async def kill() -> None:
            index, proc, read = victim
            killed["counters"] = await asyncio.to_thread(read)
            killed["at_request"] = len(results)
            t0 = time.perf_counter()
            proc.kill()                  # SIGKILL to its process group (its PID): a crashed machine
            seen: dict[str, float] = {}
            while len(seen) < len(bases) and time.perf_counter() - t0 < 10 * HEALTH_INTERVAL:
                for b in bases:
                    if b not in seen and healthy((await client.get(b.split("/api/")[0] + "/metrics")).text,
                                                 index) is False:
                        seen[b] = time.perf_counter() - t0
                await asyncio.sleep(0.05)
            killed.update(replica=index, detect_s=max(seen.values()) if len(seen) == len(bases) else None)

        async def one(url: str, model: str, messages: list[dict]) -> str:
            s = await stream(client, url, {"model": model, "messages": messages, "max_tokens": 8, "temperature": 0})
            results.append(s)
            if victim is not None and "task" not in killed and len(results) >= total // 2:
                killed["task"] = asyncio.create_task(kill())
            return s.text

        async def conversation(c: int, conv: dict) -> None:
            history = [{"role": "system", "content": f"[{tag}] Answer from this document. {conv['doc']}"}]
            for t, q in enumerate(conv["questions"]):
                history.append({"role": "user", "content": q})
                url, model = target(c + t, c)
                history.append({"role": "assistant", "content": await one(url, model, history)})

        async def group(g: int, grp: dict, k: int, q: str) -> None:
            url, model = target(g + k, REPLICAS + g)
            await one(url, model, [{"role": "system", "content": f"[{tag}] {grp['system']}"},
                                   {"role": "user", "content": q}])

        tasks = [conversation(c, conv) for c, conv in enumerate(work["conversations"])]
        tasks += [group(g, grp, k, q) for g, grp in enumerate(work["groups"]) for k, q in enumerate(grp["questions"])]
        tasks += [one(*target(u, u), [{"role": "user", "content": f"[{tag}] {p}"}])
                  for u, p in enumerate(work["unique"])]
        t0 = time.perf_counter()
        await asyncio.gather(*tasks)
        wall = time.perf_counter() - t0
        if "task" in killed:
            await killed.pop("task")
    ttfts = [s.ttft for s in results if s.ok and s.ttft is not None]
    return {"requests": len(results), "failed": sum(1 for s in results if not s.ok), "wall_s": wall,
            "throughput_rps": len(results) / wall,
            "ttft_p50": percentile(ttfts, 0.5), "ttft_p99": percentile(ttfts, 0.99),
            # a lost request: refused before its first byte (a status other than 200), or cut after it
            "lost_before_first_byte": sum(1 for s in results if not s.ok and s.status != 200),
            "lost_mid_stream": sum(1 for s in results if not s.ok and s.status == 200),
            "errors": sorted({s.error for s in results if s.error})[:3], "pinned_tally": tally, "kill": killed}


def main() -> None:
    p = parser(__doc__, rounds=1, rounds_help="rounds of (prefix, least_in_flight, pinned), interleaved")
    p.add_argument("--replicas", choices=["llama-server", "modelyard"],
                   default="llama-server" if os.access(LLAMA_SERVER, os.X_OK) else "modelyard",
                   help="the replicas' engine (default: llama-server when scripts/bench-peers built it)")
    p.add_argument("--kill", action="store_true", help="SIGKILL one replica midway through each routed run")
    p.add_argument("--seed", type=int, default=7)
    p.add_argument("--conversations", type=int, default=6)
    p.add_argument("--turns", type=int, default=3)
    p.add_argument("--groups", type=int, default=2)
    p.add_argument("--group-size", type=int, default=4)
    p.add_argument("--unique", type=int, default=4)
    p.add_argument("--abs-threshold", type=float, default=4.0, help="the gateways' balance_abs_threshold")
    p.add_argument("--rel-threshold", type=float, default=1.5, help="the gateways' balance_rel_threshold")
    p.add_argument("--doc-chars", type=int, default=1200, help="a conversation's document (context is 2048 tokens)")
    args = p.parse_args()
    if args.replicas == "llama-server" and not os.access(LLAMA_SERVER, os.X_OK):
        raise SystemExit(f"{LLAMA_SERVER} is missing: build it with scripts/bench-peers (or --replicas modelyard)")
    work = workload(args.seed, args.conversations, args.turns, args.groups, args.group_size, args.unique,
                    args.doc_chars)
    workdir = Path(tempfile.mkdtemp(prefix="bench-fleet-"))
    procs = []
    record: dict = {"args": vars(args), "health_interval_s": HEALTH_INTERVAL, "runs": []}
    try:
        replicas = [replica_proc(args.replicas, workdir, i) for i in range(REPLICAS)]
        for r in replicas:
            procs.append(r)
            start_server(r, workdir)
        urls = [r.base + "/v1" for r in replicas]
        gateways = {}
        for balance in ("prefix", "least_in_flight"):
            pair = [modelyard_proc(workdir, gateway_config(urls, balance, args.abs_threshold, args.rel_threshold,
                                                           args.replicas),
                                    free_port(), name=f"gw-{balance}-{g}")
                    for g in range(2)]
            for gw in pair:
                procs.append(gw)
                start_server(gw, workdir)
            gateways[balance] = [gw.api for gw in pair]
        every_gateway = [b for pair in gateways.values() for b in pair]
        n = 0
        with httpx.Client(timeout=30, trust_env=False) as client:
            for rnd in range(args.rounds):
                for mode in ("prefix", "least_in_flight", "pinned"):
                    n += 1
                    for i in range(REPLICAS):
                        wait_healthy(client, every_gateway, i)
                    before = [counters(client, r.base, args.replicas) for r in replicas]
                    routed_before = routed(client, gateways.get(mode, []))
                    k = rnd % REPLICAS
                    victim = ((k, replicas[k], lambda: counters(client, replicas[k].base, args.replicas))
                              if args.kill and mode != "pinned" else None)
                    out = asyncio.run(run(gateways.get(mode, []), work, f"run{n}",
                                          pinned=[r.base for r in replicas] if mode == "pinned" else None,
                                          victim=victim))
                    after = [counters(client, r.base, args.replicas) if not (victim and i == k)
                             else out["kill"]["counters"] for i, r in enumerate(replicas)]
                    computed = [a["computed"] - b["computed"] for a, b in zip(after, before)]
                    routed_after = routed(client, gateways.get(mode, []))
                    served = (out.pop("pinned_tally") if mode == "pinned" else
                              [a - b for a, b in zip(routed_after.pop("sent"), routed_before.pop("sent"))])
                    routed_after.pop("sent", None)
                    out.update({k2: routed_after[k2] - routed_before[k2] for k2 in routed_after})
                    out.update(mode=mode, round=rnd, replicas=args.replicas, computed_prompt_tokens=sum(computed),
                               per_replica_computed=computed, per_replica_requests=served,
                               max_share=max(served) / max(1, sum(served)))
                    kill = out.get("kill") or {}
                    kill.pop("counters", None)
                    record["runs"].append(out)
                    write_record(args.json, record)
                    print(f"{mode:16s} computed {sum(computed):7.0f} tok  TTFT p50 {out['ttft_p50'] or 0:.2f}s "
                          f"p99 {out['ttft_p99'] or 0:.2f}s  {out['throughput_rps']:.2f} req/s  shares {served}  "
                          f"spills {out['overload_spills']:.0f}  failed {out['failed']} {out['errors']}", flush=True)
                    if kill:
                        detect = kill["detect_s"]
                        print(f"{'':16s} killed replica {kill['replica']} after {kill['at_request']} answers: "
                              f"lost {out['failed']} ({out['lost_before_first_byte']} before the first byte, "
                              f"{out['lost_mid_stream']} mid-stream), unhealthy on both gateways after "
                              f"{'(not seen)' if detect is None else f'{detect:.2f}s'} "
                              f"(probe interval {HEALTH_INTERVAL:.1f}s)", flush=True)
                        start_server(replicas[k], workdir)
    finally:
        for proc in reversed(procs):
            proc.stop()
    by = {m: [r for r in record["runs"] if r["mode"] == m] for m in ("prefix", "least_in_flight", "pinned")}
    summary = {m: {k: median_spread([r[k] for r in rs])[0] for k in ("computed_prompt_tokens", "ttft_p50", "ttft_p99",
                                                                      "throughput_rps", "max_share", "failed")}
               for m, rs in by.items() if rs}
    record["summary"] = summary
    write_record(args.json, record)
    lif, pre, pin = summary.get("least_in_flight"), summary.get("prefix"), summary.get("pinned")
    if lif and pre:
        print(f"prefix / least_in_flight: "
              f"computed {pre['computed_prompt_tokens'] / lif['computed_prompt_tokens']:.2f}x, "
              f"TTFT p50 {pre['ttft_p50'] / lif['ttft_p50']:.2f}x, "
              f"throughput {pre['throughput_rps'] / lif['throughput_rps']:.2f}x")
    if pin and pre:
        print(f"prefix / pinned: computed {pre['computed_prompt_tokens'] / pin['computed_prompt_tokens']:.2f}x")


if __name__ == "__main__":
    sys.exit(main())
