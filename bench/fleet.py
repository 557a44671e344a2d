"""A fleet: three engine replicas on loopback, two modelyard gateways in front, a workload with the
reuse real users produce, routed by `balance = "prefix"` and by `"least_in_flight"`, interleaved,
same seed; and the limit: each conversation pinned to one replica (no router).

Replicas: three `modelyard serve` of smollm2-135m (threads 1 each: no llama-server is built on this
machine; modelyard's own counters say what each computed). Gateways: two per policy (four in
all, each pair routing over the same three replicas), requests alternating between the pair.

Workload (from --seed): --conversations multi-turn conversations over a long document (each turn
resends the history, turns alternate gateways), --groups groups of --group-size requests sharing
a long system prompt, --unique one-shot prompts; all started at once, each conversation's turns in
order. Every run tags its texts with the run's number so no run reuses another's cache, and the
texts are otherwise the same.

Per run: prompt tokens the replicas computed (their modelyard_prompt_tokens_total less their
prefix_reused_tokens), TTFT p50/p99 at the client, throughput (requests/s), each replica's share of
requests (fair share: 1/3), failures. Figures on a busy machine are indicative only.

    python bench/fleet.py --rounds 1 --json fleet.json
"""

from __future__ import annotations

import asyncio
import random
import re
import sys
import tempfile
import time
from pathlib import Path

import httpx

from common import free_port, median_spread, modelyard_proc, parser, percentile, start_server, stream, write_record

MODEL = "smollm2-135m"
REPLICAS = 3
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
            f'model = "{MODEL}"\ncontext = 2048\nparallel = 2\nthreads = 1\n')


def gateway_config(urls: list[str], balance: str, abs_threshold: float, rel_threshold: float) -> str:
    listed = ", ".join(f'"{u}"' for u in urls)
    return (f'[server]\nlog_level = "warning"\npublic_cache_counters = true\n\n'
            f'[[endpoints]]\nname = "fleet"\nengine = "openai"\n'
            f'urls = [{listed}]\nupstream_model = "{MODEL}"\nupstream_server = "modelyard"\nbalance = "{balance}"\n'
            f'balance_abs_threshold = {abs_threshold}\nbalance_rel_threshold = {rel_threshold}\n')


def routed(client: httpx.Client, bases: list[str]) -> dict:
    """The gateways' routing counters, summed over gateways and replicas."""
    out = {"overload_spills": 0.0, "prefix_hit_blocks": 0.0}
    for base in bases:
        metrics = client.get(base.split("/api/")[0] + "/metrics").text
        for key in out:
            out[key] += sum(float(v) for v in re.findall(rf'^modelyard_replica_{key}_total{{[^}}]*}} (\S+)$',
                                                          metrics, re.MULTILINE))
    return out


def counters(client: httpx.Client, base: str) -> dict:
    """A replica's prompt tokens (all), the ones its prefix cache reused, its chat requests."""
    metrics = client.get(base + "/metrics").text
    prompt = sum(float(v) for v in re.findall(rf'^modelyard_prompt_tokens_total{{endpoint="{MODEL}"}} (\S+)$',
                                              metrics, re.MULTILINE))
    requests = sum(float(v) for v in re.findall(r'^modelyard_requests_total\{[^}]*route="[^"]*chat/completions"'
                                               r'[^}]*status="200"\} (\S+)$', metrics, re.MULTILINE))
    status = client.get(f"{base}/api/v1/endpoints/{MODEL}").json()
    return {"prompt": prompt, "reused": float(status.get("prefix_reused_tokens", 0)), "requests": requests}


async def run(bases: list[str], work: dict, tag: str, *, pinned: list[str] | None = None) -> dict:
    """One run of the workload through `bases` (gateway API bases, alternated), or, `pinned`,
    each conversation/group to one replica directly."""
    results: list = []
    async with httpx.AsyncClient(timeout=600, trust_env=False) as client:
        def target(i: int, home: int) -> tuple[str, str]:
            if pinned is not None:
                return pinned[home % len(pinned)] + "/v1/chat/completions", MODEL
            return bases[i % len(bases)] + "/chat/completions", "fleet"

        async def one(url: str, model: str, messages: list[dict]) -> str:
            s = await stream(client, url, {"model": model, "messages": messages, "max_tokens": 8, "temperature": 0})
            results.append(s)
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
    ttfts = [s.ttft for s in results if s.ok and s.ttft is not None]
    return {"requests": len(results), "failed": sum(1 for s in results if not s.ok), "wall_s": wall,
            "throughput_rps": len(results) / wall,
            "ttft_p50": percentile(ttfts, 0.5), "ttft_p99": percentile(ttfts, 0.99),
            "errors": sorted({s.error for s in results if s.error})[:3]}


def main() -> None:
    p = parser(__doc__, rounds=1, rounds_help="rounds of (prefix, least_in_flight, pinned), interleaved")
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
    work = workload(args.seed, args.conversations, args.turns, args.groups, args.group_size, args.unique,
                    args.doc_chars)
    workdir = Path(tempfile.mkdtemp(prefix="bench-fleet-"))
    procs = []
    record: dict = {"args": vars(args), "runs": []}
    try:
        replicas = [modelyard_proc(workdir, replica_config(), free_port(), name=f"replica-{i}")
                    for i in range(REPLICAS)]
        for r in replicas:
            procs.append(r)
            start_server(r, workdir)
        urls = [r.base + "/v1" for r in replicas]
        gateways = {}
        for balance in ("prefix", "least_in_flight"):
            pair = [modelyard_proc(workdir, gateway_config(urls, balance, args.abs_threshold, args.rel_threshold),
                                    free_port(), name=f"gw-{balance}-{g}")
                    for g in range(2)]
            for gw in pair:
                procs.append(gw)
                start_server(gw, workdir)
            gateways[balance] = [gw.api for gw in pair]
        n = 0
        with httpx.Client(timeout=30, trust_env=False) as client:
            for rnd in range(args.rounds):
                for mode in ("prefix", "least_in_flight", "pinned"):
                    n += 1
                    before = [counters(client, r.base) for r in replicas]
                    routed_before = routed(client, gateways.get(mode, []))
                    out = asyncio.run(run(gateways.get(mode, []), work, f"run{n}",
                                          pinned=[r.base for r in replicas] if mode == "pinned" else None))
                    after = [counters(client, r.base) for r in replicas]
                    computed = [(a["prompt"] - b["prompt"]) - (a["reused"] - b["reused"])
                                for a, b in zip(after, before)]
                    served = [a["requests"] - b["requests"] for a, b in zip(after, before)]
                    routed_after = routed(client, gateways.get(mode, []))
                    out.update({k: routed_after[k] - routed_before[k] for k in routed_after})
                    out.update(mode=mode, round=rnd, computed_prompt_tokens=sum(computed),
                               per_replica_computed=computed, per_replica_requests=served,
                               max_share=max(served) / max(1, sum(served)))
                    record["runs"].append(out)
                    write_record(args.json, record)
                    print(f"{mode:16s} computed {sum(computed):7.0f} tok  TTFT p50 {out['ttft_p50'] or 0:.2f}s "
                          f"p99 {out['ttft_p99'] or 0:.2f}s  {out['throughput_rps']:.2f} req/s  shares {served}  "
                          f"spills {out['overload_spills']:.0f}  failed {out['failed']} {out['errors']}", flush=True)
    finally:
        for proc in reversed(procs):
            proc.stop()
    by = {m: [r for r in record["runs"] if r["mode"] == m] for m in ("prefix", "least_in_flight", "pinned")}
    summary = {m: {k: median_spread([r[k] for r in rs])[0] for k in ("computed_prompt_tokens", "ttft_p50", "ttft_p99",
                                                                      "throughput_rps", "max_share")}
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
