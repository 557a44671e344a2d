"""End-to-end serving benchmark: modelyard against a peer server on the same model and threads.

    .venv/bin/python bench/serve.py [--peer llama-server|llama-cpp-python|none]
                                    [--levels 1,4,16] [--rounds 2] [--quick] [--json PATH]

What it does, in order, for each round:
  1. the raw ceiling (bench/ceiling.py in a subprocess, no server running): prefill and
     decode tokens/s of bare batched llama_decode at B = each concurrency level;
  2. modelyard alone: start it, warm it up, run every concurrency level, then the
     shared-prefix test, stop it by PID;
  3. the peer alone, the same way.
One server at a time: two llama.cpp processes on 2 cores slow each other many times over.

Load: streaming POST /v1/completions, temperature 0, max_tokens 128, ~128-token prompts of
seeded random words, every prompt distinct from its first token (no server can reuse a
prompt's KV across requests), stream_options.include_usage for the true token counts.
Each level sends a bounded number of requests (2 x concurrency, at least 4) under a time cap.
  TTFT   send -> first chunk with non-empty text
  TPOT   (last text chunk - first text chunk) / (completion_tokens - 1)
  tok/s  all completion tokens of the level / the level's wall time
Shared prefix: 16 requests sharing a 512-token prefix with distinct ~16-token suffixes, vs 16
with distinct 512-token prefixes, at concurrency 4, each set after `concurrency` priming
requests of its own kind (so the prefix is cached in as many slots as run at once).

Peers (build them with scripts/bench-peers): llama-server from the llama.cpp vendored in
llama-cpp-python's sdist (~/.cache/modelyard/peers/llama-server), or llama-cpp-python's own
server (`python -m llama_cpp.server`, needs `scripts/bench-peers --python-peer`).
"""

from __future__ import annotations

import argparse
import asyncio
import datetime as dt
import json
import os
import platform
import random
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import httpx

from common import ServerProc, cpu_model as _cpu_model, free_port, median_spread as _med, ratio as _ratio

ROOT = Path(__file__).resolve().parent.parent
CACHE = Path.home() / ".cache" / "modelyard"
DEFAULT_MODEL = CACHE / "models" / "smollm2-135m.gguf"
LLAMA_SERVER = CACHE / "peers" / "llama-server"
ENDPOINT = "smollm2-135m"
PARALLEL, CONTEXT = 16, 1024

# Seed words: each prompt starts with a different one (checked: distinct first token).
WORDS = """
apple river stone window garden silver market candle harbor meadow thunder pencil mountain
lantern orchard velvet compass blanket castle desert engine feather glacier hammer island
jacket kettle ladder marble needle ocean pepper quilt rabbit saddle tunnel umbrella valley
wagon yellow zebra anchor bottle cactus dragon emerald falcon guitar helmet igloo jungle
kitten lemon magnet nickel olive parrot quartz rocket sandal tiger violin walnut yogurt
basket cotton dolphin eagle forest ginger honey ivory jelly koala lizard mango nutmeg
oyster pillow radish salmon tomato uncle vessel whistle badge cloud drum elbow fabric goose
hollow insect jewel knife lobster mirror noodle onion puzzle riddle spoon thimble village
wheat beacon cobalt dune ember fern grove heron ink juniper kayak lilac moss nectar opal
pebble quill reed spruce tulip urchin vapor willow birch cedar daisy elm flint granite
hazel iris jade kelp lotus maple nettle oak poppy quince rose sage thyme barley copper
""".split()


# ---------------------------------------------------------------------------------------
# prompts


class Tokenizer:
    """modelyard's own FFI tokenizer (no context, no threads): exact prompt lengths."""

    def __init__(self, model: Path) -> None:
        sys.path.insert(0, str(ROOT / "src"))
        from modelyard.local.ffi import LlamaModel
        self.model = LlamaModel(model)

    def count(self, text: str) -> int:
        return len(self.model.tokenize(text))

    def first(self, text: str) -> int:
        ids = self.model.tokenize(text)
        bos = self.model.bos
        return ids[1] if bos is not None and len(ids) > 1 and ids[0] == bos else ids[0]

    def close(self) -> None:
        self.model.close()


def _grow(tok: Tokenizer, head: str, rng: random.Random, n: int) -> str:
    """head, then comma-separated random words until the text is n tokens (BOS included)."""
    text = head
    while tok.count(text) < n:
        text += ", " + rng.choice(WORDS)
    return text


@dataclass
class PromptSet:
    level: list[str]                 # distinct ~128-token prompts, consumed in order
    shared: list[str]                # 512-token shared prefix + distinct ~16-token suffixes
    distinct: list[str]              # distinct 512-token prefixes + ~16-token suffixes
    warm: str = ""                   # the untimed warm-up request's prompt
    tokens: dict[str, int] = field(default_factory=dict)   # text -> local token count


def build_prompts(model: Path, n_level: int, n_prefix: int, prompt_tokens: int, prefix_tokens: int,
                  seed: int) -> PromptSet:
    """Every prompt in the set starts with a different first token, so no server can reuse any
    prompt's KV for another (except the shared prefix set, on purpose)."""
    tok = Tokenizer(model)
    try:
        rng = random.Random(seed)
        heads: list[str] = []
        seen: set[int] = set()
        for w in WORDS:
            for cand in (w.capitalize(), w, w.upper()):
                first = tok.first(cand + ",")
                if first not in seen:
                    seen.add(first)
                    heads.append(cand)
                    break
        need = n_level + 3 * n_prefix + 2
        if len(heads) < need:
            raise SystemExit(f"only {len(heads)} distinct first tokens for {need} prompts; lower the counts")
        rng.shuffle(heads)
        intro = " is the first word of a very long list of words that goes on and on"
        level = [_grow(tok, h + intro + ": " + rng.choice(WORDS), rng, prompt_tokens) for h in heads[:n_level]]
        heads = heads[n_level:]
        shared_prefix = _grow(tok, heads.pop() + intro + ": " + rng.choice(WORDS), rng, prefix_tokens)

        def suffix(head: str) -> str:
            # ~16 tokens of distinct words after the prefix
            s, base = ", " + head, tok.count(shared_prefix)
            while tok.count(shared_prefix + s) < base + 16:
                s += ", " + rng.choice(WORDS)
            return s

        shared = [shared_prefix + suffix(heads.pop()) for _ in range(n_prefix)]
        distinct = [_grow(tok, heads.pop() + intro + ": " + rng.choice(WORDS), rng, prefix_tokens) + suffix(heads.pop())
                    for _ in range(n_prefix)]
        ps = PromptSet(level, shared, distinct, warm=heads.pop() + intro + ": " + ", ".join(WORDS[:20]))
        for t in level + shared + distinct:
            ps.tokens[t] = tok.count(t)
        return ps
    finally:
        tok.close()


# ---------------------------------------------------------------------------------------
# servers


@dataclass
class Server(ServerProc):
    """A peer or modelyard under test: where it takes completions and which model name."""

    completions_path: str = "/v1/completions"
    model_field: str = ENDPOINT

    @property
    def command(self) -> str:
        return " ".join(self.argv)


def modelyard_server(workdir: Path, threads: int) -> Server:
    port = free_port()
    cfg = workdir / "modelyard.toml"
    text = (f'[server]\nhost = "127.0.0.1"\nport = {port}\nlog_level = "warning"\ngrace_period = 5\n\n'
            f'[[endpoints]]\nname = "{ENDPOINT}"\nmodel = "smollm2-135m"\nparallel = {PARALLEL}\n'
            f'context = {CONTEXT}\nthreads = {threads}\n')
    cfg.write_text(text)
    py = str(ROOT / ".venv" / "bin" / "python")
    return Server("modelyard", [py, "-m", "modelyard", "serve", "--config", str(cfg), "--port", str(port)],
                  port, "/ready", config_text=text)


def llama_server(model: Path, threads: int) -> Server:
    if not os.access(LLAMA_SERVER, os.X_OK):
        raise SystemExit(f"{LLAMA_SERVER} is missing: build it with scripts/bench-peers")
    port = free_port()
    # default batching kept: -b 2048 -ub 512; -c is the total context (16 x 1024)
    return Server("llama-server", [str(LLAMA_SERVER), "-m", str(model), "--parallel", str(PARALLEL),
                                   "-c", str(PARALLEL * CONTEXT), "-t", str(threads), "--port", str(port),
                                   "--host", "127.0.0.1"], port, "/health")


def llama_cpp_python_server(model: Path, threads: int) -> Server:
    port = free_port()
    py = str(ROOT / ".venv" / "bin" / "python")
    return Server("llama-cpp-python", [py, "-m", "llama_cpp.server", "--model", str(model),
                                       "--model_alias", ENDPOINT, "--n_threads", str(threads),
                                       "--n_threads_batch", str(threads), "--n_ctx", str(CONTEXT),
                                       # queue concurrent requests instead of cutting the running stream
                                       "--interrupt_requests", "false",
                                       "--host", "127.0.0.1", "--port", str(port)], port, "/v1/models")


# ---------------------------------------------------------------------------------------
# load


@dataclass
class Result:
    prompt_index: int
    sent: float = 0.0                # seconds after the level's start
    ttft: float | None = None
    tpot: float | None = None
    total: float | None = None
    prompt_tokens: int | None = None        # as the server's usage reports it
    local_prompt_tokens: int | None = None  # as modelyard's tokenizer counts it here
    completion_tokens: int = 0
    text_chunks: int = 0
    usage_reported: bool = False
    finish_reason: str | None = None
    error: str | None = None

    @property
    def ok(self) -> bool:
        return self.error is None and self.ttft is not None


async def one_request(client: httpx.AsyncClient, server: Server, prompt: str, max_tokens: int,
                      res: Result, t_level: float) -> None:
    body = {"model": server.model_field, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0,
            "stream": True, "stream_options": {"include_usage": True}}
    t0 = time.perf_counter()
    res.sent = t0 - t_level
    first = last = None
    try:
        async with client.stream("POST", server.base + server.completions_path, json=body) as resp:
            if resp.status_code != 200:
                res.error = f"HTTP {resp.status_code}: {(await resp.aread())[:200]!r}"
                return
            async for line in resp.aiter_lines():
                if not line.startswith("data:"):
                    continue
                data = line[5:].strip()
                if data == "[DONE]":
                    break
                chunk = json.loads(data)
                now = time.perf_counter()
                for ch in chunk.get("choices") or []:
                    if ch.get("text"):
                        res.text_chunks += 1
                        if first is None:
                            first = now
                        last = now
                    if ch.get("finish_reason"):
                        res.finish_reason = ch["finish_reason"]
                usage = chunk.get("usage")
                if usage:
                    res.usage_reported = True
                    res.prompt_tokens = usage.get("prompt_tokens")
                    res.completion_tokens = usage.get("completion_tokens") or 0
                if chunk.get("error"):
                    res.error = str(chunk["error"])[:200]
    except (httpx.HTTPError, json.JSONDecodeError) as exc:
        res.error = f"{type(exc).__name__}: {exc}"[:200]
    except asyncio.CancelledError:
        res.error = "cancelled at the time cap"
        raise
    finally:
        res.total = time.perf_counter() - t0
        if res.error is None and res.finish_reason is None:
            res.error = "the stream ended without a finish_reason"
        if first is not None:
            res.ttft = first - t0
            if not res.usage_reported:       # a server without include_usage: one chunk ~ one token
                res.completion_tokens = res.text_chunks
            if res.completion_tokens > 1:
                res.tpot = (last - first) / (res.completion_tokens - 1)


async def run_load(server: Server, prompts: list[tuple[int, str]], concurrency: int, max_tokens: int,
                   time_cap: float, counts: dict[str, int] | None = None) -> dict:
    """Send the prompts with `concurrency` in flight, none started after the cap; cancel at cap + 30 s."""
    results: list[Result] = []
    todo = list(prompts)
    limits = httpx.Limits(max_connections=concurrency + 4, max_keepalive_connections=concurrency + 4)
    async with httpx.AsyncClient(timeout=httpx.Timeout(time_cap + 60, connect=10), limits=limits) as client:
        t_level = time.perf_counter()
        deadline = t_level + time_cap

        async def worker() -> None:
            while todo and time.perf_counter() < deadline:
                idx, prompt = todo.pop(0)
                res = Result(idx, local_prompt_tokens=(counts or {}).get(prompt))
                results.append(res)
                await one_request(client, server, prompt, max_tokens, res, t_level)

        tasks = [asyncio.create_task(worker()) for _ in range(concurrency)]
        _, pending = await asyncio.wait(tasks, timeout=time_cap + 30)
        for t in pending:
            t.cancel()
        await asyncio.gather(*pending, return_exceptions=True)
        wall = time.perf_counter() - t_level
    return summarize(results, wall, concurrency, len(prompts))


def pct(xs: list[float], q: float) -> float | None:
    if not xs:
        return None
    xs = sorted(xs)
    k = (len(xs) - 1) * q
    lo, hi = int(k), min(int(k) + 1, len(xs) - 1)
    return xs[lo] + (xs[hi] - xs[lo]) * (k - lo)


def summarize(results: list[Result], wall: float, concurrency: int, planned: int) -> dict:
    ok = [r for r in results if r.ok]
    ttft = [r.ttft for r in ok]
    tpot = [r.tpot for r in ok if r.tpot is not None]
    out_tokens = sum(r.completion_tokens for r in ok)
    prompt_tokens = [r.prompt_tokens for r in ok if r.prompt_tokens is not None]
    return {
        "concurrency": concurrency, "planned": planned, "sent": len(results), "completed": len(ok),
        "errors": [r.error for r in results if r.error][:5], "wall_s": wall,
        "output_tokens": out_tokens, "output_tok_s": out_tokens / wall if wall > 0 else 0.0,
        "requests_s": len(ok) / wall if wall > 0 else 0.0,
        "ttft_p50": pct(ttft, 0.5), "ttft_p95": pct(ttft, 0.95),
        "tpot_p50": pct(tpot, 0.5), "tpot_p95": pct(tpot, 0.95),
        "mean_prompt_tokens": statistics.mean(prompt_tokens) if prompt_tokens else None,
        "prompt_tokens_match": sum(1 for r in ok if r.prompt_tokens is not None
                                   and r.prompt_tokens == r.local_prompt_tokens),
        "mean_completion_tokens": out_tokens / len(ok) if ok else None,
        "usage_reported": all(r.usage_reported for r in ok) if ok else False,
        "finish_reasons": {f: sum(1 for r in ok if r.finish_reason == f)
                           for f in sorted({r.finish_reason or "?" for r in ok})},
        "requests": [asdict(r) for r in results],
    }


# ---------------------------------------------------------------------------------------
# one server's session


@dataclass
class Plan:
    levels: list[int]
    requests_per_level: dict[int, int]
    max_tokens: int
    level_cap: float
    prefix_n: int
    prefix_concurrency: int
    prefix_max_tokens: int
    prompts: PromptSet


async def session(server: Server, plan: Plan, workdir: Path) -> dict:
    out: dict = {"server": server.name, "command": server.command, "loadavg_before": os.getloadavg()}
    if server.config_text:
        out["config"] = server.config_text
    try:
        out["startup_s"] = server.start(workdir)
        print(f"  {server.name} ready in {out['startup_s']:.1f}s (pid {server.proc.pid})", flush=True)
        # Warm-up: one short request, untimed, whose prompt no measured request shares.
        out["warmup"] = await run_load(server, [(-1, plan.prompts.warm)], 1, 8, 60)
        prompts = iter(enumerate(plan.prompts.level))
        out["levels"] = {}
        for c in plan.levels:
            batch = [next(prompts) for _ in range(plan.requests_per_level[c])]
            s = await run_load(server, batch, c, plan.max_tokens, plan.level_cap, plan.prompts.tokens)
            out["levels"][str(c)] = s
            print(f"  {server.name:16} c={c:<3d} {s['completed']}/{s['planned']} ok  "
                  f"{s['output_tok_s']:7.1f} tok/s  TTFT p50 {_ms(s['ttft_p50'])}  TPOT p50 {_ms(s['tpot_p50'])}"
                  f"  prompt {_f(s['mean_prompt_tokens'])} tok ({s['prompt_tokens_match']}/{s['completed']} = local count),"
                  f" out {_f(s['mean_completion_tokens'])} tok"
                  + (f"  errors: {s['errors']}" if s["errors"] else ""), flush=True)
        out["prefix"] = {}
        for kind in ("shared", "distinct"):
            ps = getattr(plan.prompts, kind)
            k = plan.prefix_concurrency
            prime, measured = ps[:k], ps[k:k + plan.prefix_n]
            await run_load(server, list(enumerate(prime)), k, plan.prefix_max_tokens, plan.level_cap)
            s = await run_load(server, list(enumerate(measured)), k, plan.prefix_max_tokens, plan.level_cap,
                               plan.prompts.tokens)
            out["prefix"][kind] = s
            print(f"  {server.name:16} {kind:8} prefix  {s['completed']}/{s['planned']} ok  "
                  f"TTFT p50 {_ms(s['ttft_p50'])}  p95 {_ms(s['ttft_p95'])}  prompt {_f(s['mean_prompt_tokens'])} tok"
                  + (f"  errors: {s['errors']}" if s["errors"] else ""), flush=True)
    except Exception as exc:      # record and go on with the other server
        out["error"] = f"{type(exc).__name__}: {exc}"
        print(f"  {server.name} FAILED: {out['error']}", flush=True)
    finally:
        server.stop()
        out["loadavg_after"] = os.getloadavg()
        print(f"  {server.name} done; load average before {out['loadavg_before'][0]:.2f}, "
              f"after {out['loadavg_after'][0]:.2f} (1 min)", flush=True)
    return out


def run_ceiling(model: Path, levels: list[int], threads: int, steps: int) -> dict:
    cmd = [str(ROOT / ".venv" / "bin" / "python"), str(ROOT / "bench" / "ceiling.py"), "--model", str(model),
           "--batches", ",".join(str(min(c, PARALLEL)) for c in levels), "--threads", str(threads),
           "--n-seq", str(PARALLEL), "--n-ctx-seq", str(CONTEXT), "--steps", str(steps)]
    p = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    if p.returncode != 0:
        return {"error": p.stderr[-2000:], "command": " ".join(cmd)}
    res = json.loads(p.stdout.splitlines()[0])
    res["command"] = " ".join(cmd)
    for r in res["results"]:
        print(f"  ceiling B={r['batch']:<3d} prefill {r['prefill_tok_s']:7.1f} tok/s  "
              f"decode {r['decode_tok_s']:7.1f} tok/s ({r['ms_per_step']:.1f} ms/step)", flush=True)
    return res


# ---------------------------------------------------------------------------------------
# report


def _ms(x: float | None) -> str:
    return "     -" if x is None else f"{1000 * x:6.0f}" if x >= 0.1 else f"{1000 * x:6.1f}"


def _f(x: float | None, nd: int = 1) -> str:
    return "-" if x is None else f"{x:.{nd}f}"


METRICS = [("output_tok_s", "out tok/s", 1.0), ("requests_s", "req/s", 1.0), ("ttft_p50", "TTFT p50 ms", 1000.0),
           ("ttft_p95", "TTFT p95 ms", 1000.0), ("tpot_p50", "TPOT p50 ms", 1000.0),
           ("tpot_p95", "TPOT p95 ms", 1000.0)]


def ceiling_tok_s(ceilings: list[dict], b: int, prompt: float, completion: float) -> float | None:
    """Each request costs prompt/prefill_rate + `completion` decode steps at batch b; b requests
    in parallel produce b*completion tokens in b*prompt/prefill + completion*step(b)."""
    vals = []
    for c in ceilings:
        for r in c.get("results", []):
            if r["batch"] == min(b, PARALLEL):
                t = b * prompt / r["prefill_tok_s"] + completion * r["ms_per_step"] / 1000
                vals.append(b * completion / t)
    return statistics.median(vals) if vals else None


def report(rounds: list[dict], levels: list[int], peer: str | None) -> dict:
    names = ["modelyard"] + ([peer] if peer else [])
    agg: dict = {"levels": {}, "prefix": {}}
    lines = []
    for c in levels:
        agg["levels"][str(c)] = {}
        for name in names:
            per = [r["sessions"][name]["levels"].get(str(c)) for r in rounds
                   if "levels" in r["sessions"].get(name, {})]
            per = [p for p in per if p]
            agg["levels"][str(c)][name] = {m: _med([p[m] for p in per]) for m, _, _ in METRICS}
            agg["levels"][str(c)][name]["mean_prompt_tokens"] = _med([p["mean_prompt_tokens"] for p in per])[0]
            agg["levels"][str(c)][name]["mean_completion_tokens"] = _med([p["mean_completion_tokens"] for p in per])[0]

    hdr = f"{'conc':>4}  {'server':<17}" + "".join(f"{label:>22}" for _, label, _ in METRICS)
    lines += ["", "median over rounds [min-max]", hdr, "-" * len(hdr)]
    for c in levels:
        for name in names:
            a = agg["levels"][str(c)][name]
            cells = []
            for m, _, scale in METRICS:
                med, lo, hi = a[m]
                nd = 2 if m == "requests_s" else 1 if scale == 1 or (med is not None and med * scale < 100) else 0
                cells.append("-" if med is None else
                             f"{med * scale:.{nd}f} [{lo * scale:.{nd}f}-{hi * scale:.{nd}f}]")
            lines.append(f"{c:>4}  {name:<17}" + "".join(f"{x:>22}" for x in cells))
        if peer:
            my, pe = agg["levels"][str(c)]["modelyard"], agg["levels"][str(c)][peer]
            ratios = [_ratio(my[m][0], pe[m][0]) for m, _, _ in METRICS]
            agg["levels"][str(c)]["ratio"] = dict(zip([m for m, _, _ in METRICS], ratios))
            lines.append(f"{c:>4}  {'modelyard/peer':<17}" + "".join(f"{_f(r, 2) + 'x':>22}" for r in ratios))
    lines.append("(throughput ratio > 1: modelyard faster; latency ratio > 1: modelyard slower)")
    for name in names:
        if any(not lv.get("usage_reported", True) for r in rounds
               for lv in r["sessions"].get(name, {}).get("levels", {}).values()):
            lines.append(f"({name} sent no usage: its completion tokens are counted as text chunks)")

    ceilings = [r["ceiling"] for r in rounds if r.get("ceiling") and "results" in r["ceiling"]]
    if ceilings:
        lines += ["", "raw ceiling (bare llama_decode through modelyard.local.ffi, no server; median over rounds)",
                  f"{'B':>4} {'prefill tok/s':>14} {'decode tok/s':>13} {'ms/step':>8} {'e2e ceiling tok/s':>18}"
                  f" {'modelyard %':>12}" + (f" {peer + ' %':>18}" if peer else "")]
        agg["ceiling"] = {}
        for c in levels:
            b = min(c, PARALLEL)
            rs = [r for ce in ceilings for r in ce["results"] if r["batch"] == b]
            pf = statistics.median(r["prefill_tok_s"] for r in rs)
            dec = statistics.median(r["decode_tok_s"] for r in rs)
            ms = statistics.median(r["ms_per_step"] for r in rs)
            my = agg["levels"][str(c)]["modelyard"]
            p_tok = my["mean_prompt_tokens"] or 128
            c_tok = my["mean_completion_tokens"] or 128
            e2e = ceiling_tok_s(ceilings, c, p_tok, c_tok)
            my_pct = 100 * my["output_tok_s"][0] / e2e if e2e and my["output_tok_s"][0] else None
            pe_pct = None
            if peer and agg["levels"][str(c)][peer]["output_tok_s"][0] and e2e:
                pe_pct = 100 * agg["levels"][str(c)][peer]["output_tok_s"][0] / e2e
            agg["ceiling"][str(c)] = {"batch": b, "prefill_tok_s": pf, "decode_tok_s": dec, "ms_per_step": ms,
                                      "e2e_ceiling_tok_s": e2e, "modelyard_pct": my_pct, "peer_pct": pe_pct}
            lines.append(f"{b:>4} {pf:>14.1f} {dec:>13.1f} {ms:>8.1f} {_f(e2e):>18} {_f(my_pct):>12}"
                         + (f" {_f(pe_pct):>18}" if peer else ""))
        lines.append("(e2e ceiling at concurrency c: c requests of the level's mean prompt/completion tokens cost "
                     "c*prompt/prefill_rate + completion*step_time(B=c))")

    lines += ["", "shared-prefix test: TTFT p50 ms (median over rounds), shared 512-token prefix vs distinct"]
    for name in names:
        sh = _med([r["sessions"][name]["prefix"]["shared"]["ttft_p50"] for r in rounds
                   if "shared" in r["sessions"].get(name, {}).get("prefix", {})])
        di = _med([r["sessions"][name]["prefix"]["distinct"]["ttft_p50"] for r in rounds
                   if "distinct" in r["sessions"].get(name, {}).get("prefix", {})])
        ratio = _ratio(sh[0], di[0])
        agg["prefix"][name] = {"shared_ttft_p50": sh, "distinct_ttft_p50": di, "shared_over_distinct": ratio}
        lines.append(f"  {name:<17} shared {_ms(sh[0])}  distinct {_ms(di[0])}  shared/distinct {_f(ratio, 2)}x")
    lines += targets(agg, levels, peer)
    print("\n".join(lines), flush=True)
    agg["table"] = lines
    return agg


def targets(agg: dict, levels: list[int], peer: str | None) -> list[str]:
    """Issue 3's targets, each MET or MISSED with the measured figure (n/a when not measured)."""
    def ratio(c: int, metric: str) -> float | None:
        return agg["levels"].get(str(c), {}).get("ratio", {}).get(metric) if peer else None

    checks = [("c=16 output tok/s >= 1.0x peer", ratio(16, "output_tok_s"), lambda r: r >= 1.0),
              ("c=16 TTFT p50 <= 1.0x peer", ratio(16, "ttft_p50"), lambda r: r <= 1.0),
              ("c=1 output tok/s >= 0.95x peer", ratio(1, "output_tok_s"), lambda r: r >= 0.95),
              ("c=1 TTFT p50 <= 1.1x peer", ratio(1, "ttft_p50"), lambda r: r <= 1.1)]
    for c in levels:
        pct = agg.get("ceiling", {}).get(str(c), {}).get("modelyard_pct")
        checks.append((f"c={c} >= 93% of the e2e ceiling", pct, lambda p: p >= 93.0))
    prefix = agg["prefix"].get("modelyard", {}).get("shared_over_distinct")
    checks.append(("shared 512-token prefix TTFT p50 <= 0.3x distinct", prefix, lambda r: r <= 0.3))
    out = ["", "targets (issue 3)"]
    for name, value, ok in checks:
        verdict = "n/a   " if value is None else ("MET   " if ok(value) else "MISSED")
        out.append(f"  {verdict} {name}: {'-' if value is None else f'{value:.3g}'}")
    return out


# ---------------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--peer", choices=["llama-server", "llama-cpp-python", "none"], default="llama-server")
    p.add_argument("--levels", default=None, help="concurrency levels, comma-separated (default 1,4,16)")
    p.add_argument("--rounds", type=int, default=2, help="A/B rounds (modelyard then peer, each round)")
    p.add_argument("--quick", action="store_true", help="smoke run: levels 1,4, few requests, 1 round")
    p.add_argument("--model", type=Path, default=DEFAULT_MODEL)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--max-tokens", type=int, default=128)
    p.add_argument("--prompt-tokens", type=int, default=128)
    p.add_argument("--level-cap", type=float, default=300.0, help="seconds per level before no new requests")
    p.add_argument("--no-ceiling", action="store_true")
    p.add_argument("--seed", type=int, default=1234)
    p.add_argument("--json", type=Path, help="write the raw numbers here")
    a = p.parse_args(argv)

    levels = [int(x) for x in (a.levels or ("1,4" if a.quick else "1,4,16")).split(",") if x.strip()]
    rounds = 1 if a.quick and a.rounds == 2 else a.rounds
    per_level = {c: (max(2, c) if a.quick else max(4, 2 * c)) for c in levels}
    prefix_n, prefix_c = (4, 2) if a.quick else (16, 4)
    peer = None if a.peer == "none" else a.peer
    if not a.model.exists():
        raise SystemExit(f"{a.model} is missing: `modelyard pull smollm2-135m`")

    # One prompt set for all rounds: every server sees the same prompts, each server process
    # is fresh (nothing cached from a previous round).
    t0 = time.perf_counter()
    prompts = build_prompts(a.model, sum(per_level.values()), prefix_n + prefix_c, a.prompt_tokens,
                            512, a.seed)
    print(f"built {len(prompts.tokens)} prompts in {time.perf_counter() - t0:.1f}s: level prompts "
          f"{min(prompts.tokens[t] for t in prompts.level)}-{max(prompts.tokens[t] for t in prompts.level)} tokens, "
          f"prefix prompts {min(prompts.tokens[t] for t in prompts.shared + prompts.distinct)}-"
          f"{max(prompts.tokens[t] for t in prompts.shared + prompts.distinct)} tokens (local count, BOS included)",
          flush=True)
    plan = Plan(levels, per_level, a.max_tokens, 60.0 if a.quick else a.level_cap, prefix_n, prefix_c, 16, prompts)

    record: dict = {
        "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "argv": sys.argv, "cpu": _cpu_model(), "nproc": os.cpu_count(), "python": platform.python_version(),
        "model": str(a.model), "threads": a.threads, "levels": levels, "rounds": rounds,
        "requests_per_level": per_level, "max_tokens": a.max_tokens, "peer": peer,
        "prefix_test": {"n": prefix_n, "concurrency": prefix_c, "prime": prefix_c, "prefix_tokens": 512,
                        "max_tokens": 16},
        "rounds_data": [],
    }
    if peer == "llama-server":
        record["peer_version"] = _version([str(LLAMA_SERVER), "--version"])
        flags = LLAMA_SERVER.with_suffix(".flags")
        record["peer_build"] = flags.read_text() if flags.exists() else None
    with tempfile.TemporaryDirectory(prefix="modelyard-bench-") as tmp:
        workdir = Path(tmp)
        for rnd in range(rounds):
            print(f"round {rnd + 1}/{rounds}", flush=True)
            r: dict = {"sessions": {}}
            if not a.no_ceiling:
                r["ceiling"] = run_ceiling(a.model, levels, a.threads, 64)
            servers = [modelyard_server(workdir, a.threads)]
            if peer == "llama-server":
                servers.append(llama_server(a.model, a.threads))
            elif peer == "llama-cpp-python":
                servers.append(llama_cpp_python_server(a.model, a.threads))
            for s in servers:
                r["sessions"][s.name] = asyncio.run(session(s, plan, workdir))
            record["rounds_data"].append(r)
            if a.json:   # keep what we have, in case a later round dies
                a.json.write_text(json.dumps(record, indent=1))
        for rnd, r in enumerate(record["rounds_data"]):
            for name, s in r["sessions"].items():
                if "error" in s:
                    print(f"round {rnd + 1} {name}: {s['error']}")
        record["summary"] = report(record["rounds_data"], levels, peer)
    print("\ncommands:")
    for name, s in record["rounds_data"][0]["sessions"].items():
        print(f"  {name}: {s['command']}")
        if s.get("config"):
            print("    config: " + s["config"].strip().replace("\n", "; "))
    if record["rounds_data"][0].get("ceiling", {}).get("command"):
        print(f"  ceiling: {record['rounds_data'][0]['ceiling']['command']}")
    if a.json:
        a.json.write_text(json.dumps(record, indent=1))
        print(f"raw numbers: {a.json}")
    return 0




def _version(cmd: list[str]) -> str | None:
    try:
        p = subprocess.run(cmd, capture_output=True, text=True, timeout=20)
        return (p.stdout + p.stderr).strip()[-400:]
    except (OSError, subprocess.TimeoutExpired):
        return None


if __name__ == "__main__":
    sys.exit(main())
