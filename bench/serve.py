"""End-to-end serving benchmark: modelyard against a peer server on the same model file and threads.

    python bench/serve.py [--peer llama-server|llama-cpp-python|none] [--models LIST | --model PATH]
                          [--levels 1,4,16] [--sampled-levels 16] [--rounds 2] [--quick]
                          [--cache-prompts 32] [--cache-concurrency 16] [--deterministic true|false] [--batch N]
                          [--json PATH]

Models (--models, comma-separated, default the first three; --model PATH: one GGUF file instead):
  smollm2-135m        the store's smollm2 (Q4_1)
  gemma3-270m         the store's gemma3 (Q4_K_M)
  smollm2-135m-q4_0   smollm2 with `convert = "q4_0"`; the peer runs the very file modelyard
                      serves (<store>/converted/smollm2-135m.q4_0.gguf, made once before the rounds
                      by modelyard.local.convert, the function modelyard itself calls)
  smollm2-135m-q8_0   the same with `convert = "q8_0"` (only when named)

Each round, for each model, one server at a time (two llama.cpp processes on 2 cores slow each
other many times over), so the rounds interleave A/B/A/B:
  1. the raw ceiling: bench/ceiling.py in a subprocess, no server running;
  2. modelyard alone (one endpoint: parallel 16, context 1024, --threads), then the peer alone,
     each started fresh, warmed with one untimed request, measured, stopped by PID:
       greedy    temperature 0 at each of --levels
       sampled   temperature 0.8, top_p 0.95, a seed per request, at each of --sampled-levels
                 (the peers get top_k 0 and min_p 0 too, so both sample the whole vocabulary)
       cache     --cache-prompts distinct prompts at --cache-concurrency, then the same ones
                 again: second-pass TTFT p50 / first-pass TTFT p50 (a prefix cache beyond the
                 slots makes it small); every other prompt greedy, the rest seeded, 16 tokens,
                 so pass 2 must repeat pass 1's text exactly (the invariance check under load)
       shared    (first model only) issue 3's shared-prefix test: 16 requests sharing a 512-token
                 prefix vs 16 with distinct ones, at concurrency 4, after priming requests
     modelyard's endpoint status (host_cache_* counters, system info) is kept in the JSON.

Load: streaming POST /v1/completions with stream_options.include_usage, max_tokens 128, ~128-token
prompts of seeded random words, each starting with a different first token under that model's
tokenizer (no server can reuse one prompt's KV for another); every level sends max(4, 2 x c)
requests under a time cap. Figures: TTFT = send -> first chunk with text; TPOT = (last text
chunk - first) / (completion_tokens - 1); tok/s = the level's completion tokens / its wall time;
p50/p95 = common.percentile (linear interpolation between closest ranks). Tables show the median
over rounds [min-max]; ratios are modelyard / peer of those medians, with each round's own ratio.
The run ends with the targets of issue 3 and issue 8, each MET, MISSED or NOT RUN.

Peers (scripts/bench-peers builds them): llama-server from the llama.cpp vendored in
llama-cpp-python's sdist (~/.cache/modelyard/peers/llama-server), or llama-cpp-python's own server
(`python -m llama_cpp.server`, `scripts/bench-peers --python-peer`).

Changed in issue 8: --model PATH still benchmarks one file (endpoint named after its stem);
--models, --sampled-levels, --requests, --cache-prompts, --cache-concurrency, --deterministic are
new; --quick also lowers the cache pass to 4 prompts at c=4 and skips nothing else.
"""

from __future__ import annotations

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
from dataclasses import dataclass, field
from pathlib import Path

import httpx

from common import (ROOT, ServerProcess, Stream, cpu_model, cpu_simd_flags, free_port, ints, machine_line,
                    median_spread as _med, modelyard_proc, parser, percentile, ratio as _ratio, server_proc,
                    start_server, stream, write_record)

CACHE = Path(os.environ.get("MODELYARD_HOME") or Path.home() / ".cache" / "modelyard").expanduser()
LLAMA_SERVER = CACHE / "peers" / "llama-server"
PARALLEL, CONTEXT = 16, 1024
GREEDY = {"temperature": 0}
SAMPLED = {"temperature": 0.8, "top_p": 0.95}
PEER_SAMPLING = {"top_k": 0, "min_p": 0.0}   # llama.cpp's defaults (40, 0.05) would cut the vocabulary first

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


@dataclass(frozen=True)
class Model:
    name: str                  # the endpoint's name, and the row label
    ref: str                   # modelyard's `model =`: a store name or a path
    convert: str | None = None


MODELS = {m.name: m for m in (Model("smollm2-135m", "smollm2-135m"), Model("gemma3-270m", "gemma3-270m"),
                              Model("smollm2-135m-q4_0", "smollm2-135m", "q4_0"),
                              Model("smollm2-135m-q8_0", "smollm2-135m", "q8_0"))}
DEFAULT_MODELS = ("smollm2-135m", "gemma3-270m", "smollm2-135m-q4_0")


def model_file(m: Model, threads: int) -> Path:
    """The GGUF file both servers load: the store's, or the converted one modelyard would make."""
    from modelyard.local.convert import converted
    from modelyard.store import ModelStore
    path = ModelStore(CACHE, progress=False).resolve(m.ref)
    # the folder modelyard's registry passes (store root / "converted"): the same file, made once
    return converted(path, m.convert, CACHE / "converted", threads) if m.convert else path


# ---------------------------------------------------------------------------------------
# prompts


class Tokenizer:
    """modelyard's own FFI tokenizer (no context, no threads): exact prompt lengths."""

    def __init__(self, model: Path) -> None:
        from modelyard.local.ffi import LlamaModel
        self.model = LlamaModel(model)

    def count(self, text: str) -> int:
        return len(self.model.tokenize(text))

    def first(self, text: str) -> int:
        ids = self.model.tokenize(text)
        bos = self.model.bos
        return ids[1] if bos is not None and len(ids) > 1 and ids[0] == bos else ids[0]


def _grow(tok: Tokenizer, head: str, rng: random.Random, n: int) -> str:
    """head, then comma-separated random words until the text is n tokens (BOS included)."""
    text = head
    while tok.count(text) < n:
        text += ", " + rng.choice(WORDS)
    return text


@dataclass
class PromptSet:
    sets: dict[str, list[str]]       # phase -> distinct ~prompt_tokens prompts, consumed in order
    shared: list[str]                # 512-token shared prefix + distinct ~16-token suffixes
    distinct: list[str]              # distinct 512-token prefixes + ~16-token suffixes
    warm: str = ""                   # the untimed warm-up request's prompt
    tokens: dict[str, int] = field(default_factory=dict)   # text -> local token count


def build_prompts(model: Path, counts: dict[str, int], n_prefix: int, prompt_tokens: int, prefix_tokens: int,
                  seed: int) -> PromptSet:
    """Every prompt in the set starts with a different first token, so no server can reuse any
    prompt's KV for another (except the shared prefix set, on purpose)."""
    tok = Tokenizer(model)
    try:
        rng = random.Random(seed)
        heads: list[str] = []
        seen: set[int] = set()
        for w in WORDS:       # every spelling whose first token is new (one per word is too few)
            for cand in (w.capitalize(), w, w.upper()):
                first = tok.first(cand + ",")
                if first not in seen:
                    seen.add(first)
                    heads.append(cand)
        need = sum(counts.values()) + 3 * n_prefix + 2
        if len(heads) < need:
            raise SystemExit(f"only {len(heads)} distinct first tokens for {need} prompts; lower the counts")
        rng.shuffle(heads)
        intro = " is the first word of a very long list of words that goes on and on"

        def fresh(n: int) -> str:
            return _grow(tok, heads.pop() + intro + ": " + rng.choice(WORDS), rng, n)

        sets = {phase: [fresh(prompt_tokens) for _ in range(n)] for phase, n in counts.items()}
        shared_prefix = fresh(prefix_tokens)

        def suffix(head: str, prefix: str) -> str:      # ~16 tokens of distinct words after the prefix
            s, base = ", " + head, tok.count(prefix)
            while tok.count(prefix + s) < base + 16:
                s += ", " + rng.choice(WORDS)
            return s

        shared = [shared_prefix + suffix(heads.pop(), shared_prefix) for _ in range(n_prefix)]
        distinct = []
        for _ in range(n_prefix):
            p = fresh(prefix_tokens)
            distinct.append(p + suffix(heads.pop(), p))
        ps = PromptSet(sets, shared, distinct, warm=heads.pop() + intro + ": " + ", ".join(WORDS[:20]))
        for t in [t for s in sets.values() for t in s] + shared + distinct:
            ps.tokens[t] = tok.count(t)
        return ps
    finally:
        tok.model.close()


# ---------------------------------------------------------------------------------------
# servers


def modelyard_server(workdir: Path, m: Model, threads: int, deterministic: str | None,
                     step_tokens: int | None = None) -> ServerProcess:
    port = free_port()
    return modelyard_proc(workdir, (
        f'[server]\nhost = "127.0.0.1"\nport = {port}\nlog_level = "warning"\ngrace_period = 5\n'
        # one tenant: the host_cache_* counters kept in the JSON are shown only to admins otherwise
        f'store_dir = "{CACHE}"\npublic_cache_counters = true\n\n'
        f'[[endpoints]]\nname = "{m.name}"\nmodel = "{m.ref}"\nparallel = {PARALLEL}\ncontext = {CONTEXT}\n'
        f'threads = {threads}\n' + (f'convert = "{m.convert}"\n' if m.convert else "")
        + (f"deterministic = {deterministic}\n" if deterministic else "")
        + (f"batch = {step_tokens}\n" if step_tokens else "")), port)


def peer_server(peer: str, path: Path, alias: str, threads: int) -> ServerProcess:
    port = free_port()
    if peer == "llama-server":
        # default batching kept: -b 2048 -ub 512; -c is the total context (16 x 1024)
        return server_proc(peer, [str(LLAMA_SERVER), "-m", str(path), "--parallel", str(PARALLEL),
                                 "-c", str(PARALLEL * CONTEXT), "-t", str(threads), "--port", str(port),
                                 "--host", "127.0.0.1"], port, "/health")
    return server_proc(peer, [sys.executable, "-m", "llama_cpp.server", "--model", str(path),
                             "--model_alias", alias, "--n_threads", str(threads),
                             "--n_threads_batch", str(threads), "--n_ctx", str(CONTEXT),
                             # queue concurrent requests instead of cutting the running stream
                             "--interrupt_requests", "false",
                             "--host", "127.0.0.1", "--port", str(port)], port, "/v1/models")


# ---------------------------------------------------------------------------------------
# load


def sampling(mode: str, idx: int, seed: int, peer: bool) -> dict:
    """greedy, sampled (seeded per request), or mixed: even prompts greedy, odd ones seeded."""
    if mode == "greedy" or (mode == "mixed" and idx % 2 == 0):
        return dict(GREEDY)
    return {**SAMPLED, "seed": seed + idx, **(PEER_SAMPLING if peer else {})}


async def run_load(server: ServerProcess, model: str, prompts: list[str], concurrency: int, max_tokens: int,
                   time_cap: float, mode: str = "greedy", seed: int = 0, counts: dict[str, int] | None = None) -> dict:
    """Send the prompts with `concurrency` in flight, none started after the cap; cancel at cap + 30 s."""
    results: list[tuple[int, str, Stream]] = []
    todo = list(enumerate(prompts))
    url = server.base + "/v1/completions"
    limits = httpx.Limits(max_connections=concurrency + 4, max_keepalive_connections=concurrency + 4)
    async with httpx.AsyncClient(timeout=httpx.Timeout(time_cap + 60, connect=10), limits=limits,
                                 trust_env=False) as client:
        t_level = time.perf_counter()
        deadline = t_level + time_cap

        async def worker() -> None:
            while todo and time.perf_counter() < deadline:
                idx, prompt = todo.pop(0)
                body = {"model": model, "prompt": prompt, "max_tokens": max_tokens,
                        "stream_options": {"include_usage": True},
                        **sampling(mode, idx, seed, server.name != "modelyard")}
                results.append((idx, prompt, Stream()))
                await stream(client, url, body, out=results[-1][2])

        tasks = [asyncio.create_task(worker()) for _ in range(concurrency)]
        _, pending = await asyncio.wait(tasks, timeout=time_cap + 30)
        for t in pending:
            t.cancel()
        await asyncio.gather(*pending, return_exceptions=True)
        wall = time.perf_counter() - t_level
    ok = [(i, p, s) for i, p, s in results if s.ok and s.ttft is not None]
    out_tokens = sum(s.completion_tokens for _, _, s in ok)
    prompt_tokens = [s.usage["prompt_tokens"] for _, _, s in ok if s.usage and "prompt_tokens" in s.usage]
    ttft = [s.ttft for _, _, s in ok]
    tpot = [s.tpot for _, _, s in ok if s.tpot is not None]
    return {
        "concurrency": concurrency, "planned": len(prompts), "sent": len(results), "completed": len(ok),
        "errors": [s.error for _, _, s in results if s.error][:5], "wall_s": wall,
        "output_tokens": out_tokens, "output_tok_s": out_tokens / wall if wall > 0 else 0.0,
        "ttft_p50": percentile(ttft, 0.5), "ttft_p95": percentile(ttft, 0.95),
        "tpot_p50": percentile(tpot, 0.5), "tpot_p95": percentile(tpot, 0.95),
        "mean_prompt_tokens": statistics.mean(prompt_tokens) if prompt_tokens else None,
        "prompt_tokens_match": sum(1 for _, p, s in ok if (s.usage or {}).get("prompt_tokens") == (counts or {}).get(p)),
        "mean_completion_tokens": out_tokens / len(ok) if ok else None,
        "usage_reported": all(s.usage for _, _, s in ok) if ok else False,
        "texts": {str(i): s.text for i, _, s in ok},
        "requests": [{"i": i, "ttft": s.ttft, "tpot": s.tpot, "tokens": s.completion_tokens, "error": s.error}
                     for i, _, s in results],
    }


@dataclass
class Plan:
    levels: list[int]
    sampled_levels: list[int]
    requests: dict[int, int]         # concurrency -> requests per level
    max_tokens: int
    level_cap: float
    cache_n: int
    cache_concurrency: int
    prefix_n: int
    prefix_concurrency: int
    seed: int
    deterministic: str | None


def _line(name: str, label: str, s: dict) -> None:
    print(f"  {name:16} {label:12} {s['completed']}/{s['planned']} ok  {s['output_tok_s']:7.1f} tok/s  "
          f"TTFT p50 {_ms(s['ttft_p50'])}  TPOT p50 {_ms(s['tpot_p50'])}  prompt {_f(s['mean_prompt_tokens'])} tok"
          f" ({s['prompt_tokens_match']}/{s['completed']} = local count), out {_f(s['mean_completion_tokens'])} tok"
          + (f"  errors: {s['errors']}" if s["errors"] else ""), flush=True)


async def session(server: ServerProcess, m: Model, plan: Plan, ps: PromptSet, workdir: Path, shared: bool) -> dict:
    out: dict = {"server": server.name, "command": server.command, "config": server.config_text,
                 "loadavg_before": os.getloadavg()}
    try:
        out["startup_s"] = start_server(server, workdir, 300)
        print(f"  {server.name} ready in {out['startup_s']:.1f}s (pid {server.pid})", flush=True)
        await run_load(server, m.name, [ps.warm], 1, 8, 60)    # untimed, shares no prompt
        level_prompts = {mode: iter(ps.sets[mode]) for mode in ("greedy", "sampled")}
        for mode, levels in (("greedy", plan.levels), ("sampled", plan.sampled_levels)):
            out[mode] = {}
            for c in levels:
                batch = [next(level_prompts[mode]) for _ in range(plan.requests[c])]
                s = await run_load(server, m.name, batch, c, plan.max_tokens, plan.level_cap, mode, plan.seed,
                                   ps.tokens)
                out[mode][str(c)] = s
                _line(server.name, f"{mode} c={c}", s)
        if plan.cache_n:
            k = plan.cache_concurrency
            passes = [await run_load(server, m.name, ps.sets["cache"], k, 16, plan.level_cap, "mixed", plan.seed,
                                     ps.tokens) for _ in range(2)]
            same = sum(1 for i, t in passes[0]["texts"].items() if passes[1]["texts"].get(i) == t)
            out["cache"] = {"first": passes[0], "second": passes[1], "identical": same, "of": plan.cache_n,
                            "second_over_first": _ratio(passes[1]["ttft_p50"], passes[0]["ttft_p50"])}
            _line(server.name, "cache pass 1", passes[0])
            _line(server.name, "cache pass 2", passes[1])
            print(f"  {server.name:16} cache        pass 2 TTFT p50 / pass 1: {_f(out['cache']['second_over_first'], 3)}x"
                  f"; texts identical {same}/{plan.cache_n}", flush=True)
        if shared:
            out["prefix"] = {}
            for kind in ("shared", "distinct"):
                prompts, k = getattr(ps, kind), plan.prefix_concurrency
                await run_load(server, m.name, prompts[:k], k, 16, plan.level_cap)     # priming
                s = await run_load(server, m.name, prompts[k:k + plan.prefix_n], k, 16, plan.level_cap,
                                   counts=ps.tokens)
                out["prefix"][kind] = s
                _line(server.name, f"{kind} pfx", s)
            out["prefix"]["shared_over_distinct"] = _ratio(out["prefix"]["shared"]["ttft_p50"],
                                                           out["prefix"]["distinct"]["ttft_p50"])
        if server.name == "modelyard":
            with httpx.Client(timeout=10, trust_env=False) as c:
                out["status"] = c.get(f"{server.base}/api/v1/endpoints/{m.name}").json()
            hc = {k: v for k, v in out["status"].items() if k.startswith("host_cache")}
            if hc:
                print(f"  modelyard        status: {hc}", flush=True)
    except Exception as exc:      # record and go on with the other server
        out["error"] = f"{type(exc).__name__}: {exc}"
        print(f"  {server.name} FAILED: {out['error']}", flush=True)
    finally:
        server.stop()
        out["loadavg_after"] = os.getloadavg()
        print(f"  {server.name} done; load average before {out['loadavg_before'][0]:.2f}, "
              f"after {out['loadavg_after'][0]:.2f} (1 min)", flush=True)
    return out


def run_ceiling(path: Path, levels: list[int], threads: int, steps: int, deterministic: str | None) -> dict:
    # The ceiling of the kernels modelyard's endpoint runs (deterministic unless told otherwise).
    cmd = [sys.executable, str(ROOT / "bench" / "ceiling.py"), "--model", str(path),
           "--batches", ",".join(str(min(c, PARALLEL)) for c in levels), "--threads", str(threads),
           "--n-seq", str(PARALLEL), "--n-ctx-seq", str(CONTEXT), "--steps", str(steps),
           "--deterministic", deterministic or "true"]
    p = subprocess.run(cmd, capture_output=True, text=True, timeout=600,
                       env={**os.environ, "PYTHONPATH": str(ROOT / "src")})
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


METRICS = [("output_tok_s", "out tok/s", 1.0), ("ttft_p50", "TTFT p50 ms", 1000.0), ("ttft_p95", "TTFT p95 ms", 1000.0),
           ("tpot_p50", "TPOT p50 ms", 1000.0), ("tpot_p95", "TPOT p95 ms", 1000.0)]


def per_round(rounds: list[dict], model: str, server: str, *path: str) -> list:
    """rounds[i]["sessions"][model][server][path...] for each round (None where missing)."""
    out = []
    for r in rounds:
        x = r["sessions"].get(model, {}).get(server)
        for k in path:
            x = x.get(k) if isinstance(x, dict) else None
        out.append(x)
    return out


@dataclass
class Figure:
    """modelyard / peer of the medians over rounds, with each round's own ratio."""
    value: float | None
    rounds: list[float]

    def __str__(self) -> str:
        if self.value is None:
            return "-"
        spread = f" (rounds {min(self.rounds):.2f}-{max(self.rounds):.2f})" if len(self.rounds) > 1 else ""
        return f"{self.value:.2f}x{spread}"


def vs_peer(rounds: list[dict], model: str, peer: str | None, *path: str) -> Figure:
    if not peer:
        return Figure(None, [])
    mine, theirs = per_round(rounds, model, "modelyard", *path), per_round(rounds, model, peer, *path)
    each = [x for x in (_ratio(a, b) for a, b in zip(mine, theirs)) if x is not None]
    return Figure(_ratio(_med(mine)[0], _med(theirs)[0]), each)


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


def report(rounds: list[dict], models: list[Model], plan: Plan, peer: str | None) -> dict:
    names = ["modelyard"] + ([peer] if peer else [])
    agg: dict = {}
    lines: list[str] = []
    for m in models:
        a = agg[m.name] = {"ceiling_pct": {}}
        lines += ["", f"== {m.name}: median over rounds [min-max]",
                  f"{'load':>12}  {'server':<17}" + "".join(f"{label:>22}" for _, label, _ in METRICS)]
        for mode, levels in (("greedy", plan.levels), ("sampled", plan.sampled_levels)):
            for c in levels:
                for name in names:
                    cells = []
                    for key, _, scale in METRICS:
                        med, lo, hi = _med(per_round(rounds, m.name, name, mode, str(c), key))
                        nd = 1 if scale == 1 or (med is not None and med * scale < 100) else 0
                        cells.append("-" if med is None else
                                     f"{med * scale:.{nd}f} [{lo * scale:.{nd}f}-{hi * scale:.{nd}f}]")
                    lines.append(f"{mode + ' c=' + str(c):>12}  {name:<17}" + "".join(f"{x:>22}" for x in cells))
                if peer:
                    figs = [vs_peer(rounds, m.name, peer, mode, str(c), key) for key, _, _ in METRICS]
                    lines.append(f"{'':>12}  {'modelyard/peer':<17}" + "".join(f"{_f(f.value, 2) + 'x':>22}" for f in figs))
        ceilings = [r["ceiling"][m.name] for r in rounds if "results" in r.get("ceiling", {}).get(m.name, {})]
        if ceilings:
            lines.append("  ceiling (bare llama_decode, no server): e2e tok/s and modelyard's share, greedy")
            for c in plan.levels:
                p_tok = _med(per_round(rounds, m.name, "modelyard", "greedy", str(c), "mean_prompt_tokens"))[0]
                c_tok = _med(per_round(rounds, m.name, "modelyard", "greedy", str(c), "mean_completion_tokens"))[0]
                mine = _med(per_round(rounds, m.name, "modelyard", "greedy", str(c), "output_tok_s"))[0]
                e2e = ceiling_tok_s(ceilings, c, p_tok or 128, c_tok or 128)
                pct = 100 * mine / e2e if mine and e2e else None
                a["ceiling_pct"][str(c)] = pct
                lines.append(f"    c={c:<3d} ceiling {_f(e2e)} tok/s, modelyard {_f(pct)}%")
        for name in names:
            if any(per_round(rounds, m.name, name, "cache")):
                r2 = _med(per_round(rounds, m.name, name, "cache", "second_over_first"))
                same = [x for x in per_round(rounds, m.name, name, "cache", "identical") if x is not None]
                lines.append(f"  cache pass, {name}: pass 2 / pass 1 TTFT p50 {_f(r2[0], 3)}x [{_f(r2[1], 3)}-"
                             f"{_f(r2[2], 3)}], texts identical {min(same)}/{plan.cache_n} (worst round)")
            if any(per_round(rounds, m.name, name, "prefix")):
                sh = _med(per_round(rounds, m.name, name, "prefix", "shared", "ttft_p50"))[0]
                di = _med(per_round(rounds, m.name, name, "prefix", "distinct", "ttft_p50"))[0]
                r = _med(per_round(rounds, m.name, name, "prefix", "shared_over_distinct"))[0]
                lines.append(f"  shared-prefix test, {name}: TTFT p50 shared {_ms(sh)} ms, distinct {_ms(di)} ms,"
                             f" shared/distinct {_f(r, 2)}x (median of the rounds' ratios)")
    lines += targets(rounds, agg, models, plan, peer)
    print("\n".join(lines), flush=True)
    return {"per_model": agg, "table": lines}


def _verdicts(title: str, checks: list[tuple[str, object, bool | None]]) -> list[str]:
    """(name, figure, met or None): one MET / MISSED / NOT RUN line each."""
    out = ["", title]
    for name, figure, met in checks:
        verdict = "NOT RUN" if met is None else "MET    " if met else "MISSED "
        out.append(f"  {verdict} {name}: {figure if met is not None else '-'}")
    return out


def targets(rounds: list[dict], agg: dict, models: list[Model], plan: Plan, peer: str | None) -> list[str]:
    ran = {m.name for m in models}

    def check(name: str, model: str, path: tuple[str, ...], op: str, limit: float, vs: bool = True):
        """(name, figure, met): modelyard / peer when vs, else modelyard's own figure."""
        if model not in ran:
            fig = Figure(None, [])
        elif vs:
            fig = vs_peer(rounds, model, peer, *path)
        else:
            vals = [x for x in per_round(rounds, model, "modelyard", *path) if x is not None]
            fig = Figure(statistics.median(vals) if vals else None, vals)
        met = None if fig.value is None else fig.value >= limit if op == ">=" else fig.value <= limit
        return name, fig, met

    def ceiling(name: str, model: str, c: int):
        v = agg.get(model, {}).get("ceiling_pct", {}).get(str(c))
        return name, f"{_f(v)}%", None if v is None else v >= 93.0

    s = "smollm2-135m"
    c3 = [check("c=16 output tok/s >= 1.0x peer", s, ("greedy", "16", "output_tok_s"), ">=", 1.0),
          check("c=16 TTFT p50 <= 1.0x peer", s, ("greedy", "16", "ttft_p50"), "<=", 1.0),
          check("c=1 output tok/s >= 0.95x peer", s, ("greedy", "1", "output_tok_s"), ">=", 0.95),
          check("c=1 TTFT p50 <= 1.1x peer", s, ("greedy", "1", "ttft_p50"), "<=", 1.1)]
    c3 += [ceiling(f"c={c} >= 93% of the e2e ceiling", s, c) for c in plan.levels]
    c3.append(check("shared 512-token prefix TTFT p50 <= 0.3x distinct", s, ("prefix", "shared_over_distinct"),
                    "<=", 0.3, vs=False))
    out = _verdicts("targets (issue 3, smollm2-135m greedy)", c3)

    c8 = []
    for m in MODELS:
        same = [x for x in per_round(rounds, m, "modelyard", "cache", "identical") if x is not None]
        c8.append((f"{m}: invariance, cache pass 2 text == pass 1 (greedy + seeded, c={plan.cache_concurrency})",
                   f"{min(same) if same else '-'}/{plan.cache_n} (worst round)",
                   min(same) == plan.cache_n if same and m in ran else None))
        c8.append(check(f"{m}: greedy c=16 output tok/s >= 1.0x peer", m, ("greedy", "16", "output_tok_s"), ">=", 1.0))
        c8.append(check(f"{m}: greedy c=1 output tok/s >= 0.95x peer", m, ("greedy", "1", "output_tok_s"), ">=", 0.95))
        if m == s:
            c8.append(ceiling(f"{m}: c=1 >= 93% of the bare-decode ceiling", m, 1))
        c8.append(check(f"{m}: sampled (t 0.8, top_p 0.95) c=16 output tok/s >= 0.95x peer", m,
                        ("sampled", "16", "output_tok_s"), ">=", 0.95))
        c8.append(check(f"{m}: greedy c=16 TPOT p50 <= 1.0x peer", m, ("greedy", "16", "tpot_p50"), "<=", 1.0))
        c8.append(check(f"{m}: prefix cache, pass 2 TTFT p50 <= 0.3x pass 1 ({plan.cache_n} prompts, "
                        f"c={plan.cache_concurrency})", m, ("cache", "second_over_first"), "<=", 0.3, vs=False))
    out += _verdicts("targets (issue 8)", c8)
    if len(rounds) < 2:
        out.append(f"  ({len(rounds)} round: the targets ask for medians of at least 2, --rounds 2)")
    out.append("  " + machine_line())
    return out


# ---------------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    p = parser(__doc__, rounds=2, rounds_help="A/B rounds (each model: modelyard then the peer)",
               json_help="write the raw numbers here")
    p.add_argument("--peer", choices=["llama-server", "llama-cpp-python", "none"], default="llama-server")
    p.add_argument("--models", default=",".join(DEFAULT_MODELS), help=f"comma-separated, of {', '.join(MODELS)}")
    p.add_argument("--model", type=Path, help="benchmark this one GGUF file instead of --models")
    p.add_argument("--levels", default=None, help="greedy concurrency levels (default 1,4,16; --quick 1,4)")
    p.add_argument("--sampled-levels", default=None, help="sampled concurrency levels (default 16; --quick 4; "
                   "'' for none)")
    p.add_argument("--requests", type=int, help="requests per level (default max(4, 2 x c); --quick max(2, c))")
    p.add_argument("--cache-prompts", type=int, default=None, help="cache pass prompts (default 32, --quick 4; 0: skip)")
    p.add_argument("--cache-concurrency", type=int, default=None, help="cache pass concurrency (default 16, --quick 4)")
    p.add_argument("--no-shared-prefix", action="store_true", help="skip issue 3's shared-prefix test")
    p.add_argument("--quick", action="store_true", help="smoke run: 1 round, small levels and counts")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--max-tokens", type=int, default=128)
    p.add_argument("--prompt-tokens", type=int, default=128)
    p.add_argument("--level-cap", type=float, default=300.0, help="seconds per level before no new requests")
    p.add_argument("--batch", type=int, default=None,
                   help="write `batch = N` (the step's token budget) into modelyard's endpoint (default: the engine's, 512)")
    p.add_argument("--deterministic", choices=["true", "false"],
                   help="write `deterministic = ...` into modelyard's endpoint (default: the engine's default)")
    p.add_argument("--no-ceiling", action="store_true")
    p.add_argument("--seed", type=int, default=1234)
    a = p.parse_args(argv)

    q = a.quick
    levels = ints(a.levels or ("1,4" if q else "1,4,16"))
    sampled = ints(a.sampled_levels if a.sampled_levels is not None else ("4" if q else "16"))
    rounds = 1 if q and a.rounds == 2 else a.rounds
    requests = {c: a.requests or (max(2, c) if q else max(4, 2 * c)) for c in set(levels) | set(sampled)}
    cache_n = a.cache_prompts if a.cache_prompts is not None else (4 if q else 32)
    prefix_n, prefix_c = (4, 2) if q else (16, 4)
    plan = Plan(levels, sampled, requests, a.max_tokens, 60.0 if q else a.level_cap, cache_n,
                a.cache_concurrency or (4 if q else 16), 0 if a.no_shared_prefix else prefix_n, prefix_c,
                a.seed, a.deterministic)
    peer = None if a.peer == "none" else a.peer
    if peer == "llama-server" and not os.access(LLAMA_SERVER, os.X_OK):
        raise SystemExit(f"{LLAMA_SERVER} is missing: build it with scripts/bench-peers (or --peer none)")
    if a.model:
        models = [Model(a.model.stem, str(a.model.resolve()))]
    else:
        unknown = [n for n in a.models.split(",") if n not in MODELS]
        if unknown:
            p.error(f"--models: unknown {unknown}; choose from {list(MODELS)}")
        models = [MODELS[n] for n in a.models.split(",")]

    files, prompts = {}, {}
    for m in models:
        t0 = time.perf_counter()
        files[m.name] = model_file(m, a.threads)
        counts = {"greedy": sum(requests[c] for c in levels), "sampled": sum(requests[c] for c in sampled),
                  "cache": cache_n}
        prompts[m.name] = ps = build_prompts(files[m.name], counts, prefix_n + prefix_c, a.prompt_tokens, 512, a.seed)
        lens = sorted(ps.tokens[t] for s in ps.sets.values() for t in s)
        print(f"{m.name}: {files[m.name]}; {len(ps.tokens)} prompts in {time.perf_counter() - t0:.1f}s, "
              f"{lens[0]}-{lens[-1]} tokens (its tokenizer, BOS included)", flush=True)

    record: dict = {
        "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"), "argv": sys.argv,
        "cpu": cpu_model(), "cpu_flags": cpu_simd_flags(), "nproc": os.cpu_count(),
        "python": platform.python_version(), "threads": a.threads, "peer": peer, "rounds": rounds,
        "models": {m.name: str(files[m.name]) for m in models}, "plan": {k: v for k, v in vars(plan).items()},
        "rounds_data": [],
    }
    if peer == "llama-server":
        record["peer_version"] = _version([str(LLAMA_SERVER), "--version"])
        flags = LLAMA_SERVER.with_suffix(".flags")
        record["peer_build"] = flags.read_text() if flags.exists() else None
    with tempfile.TemporaryDirectory(prefix="modelyard-bench-") as tmp:
        workdir = Path(tmp)
        for rnd in range(rounds):
            r: dict = {"sessions": {}, "ceiling": {}}
            for m in models:
                print(f"round {rnd + 1}/{rounds}: {m.name}", flush=True)
                if not a.no_ceiling:
                    r["ceiling"][m.name] = run_ceiling(files[m.name], levels, a.threads, 64, a.deterministic)
                servers = [modelyard_server(workdir, m, a.threads, a.deterministic, a.batch)]
                if peer:
                    servers.append(peer_server(peer, files[m.name], m.name, a.threads))
                r["sessions"][m.name] = {s.name: asyncio.run(session(s, m, plan, prompts[m.name], workdir,
                                                                     shared=m is models[0] and plan.prefix_n > 0))
                                         for s in servers}
            record["rounds_data"].append(r)
            if a.json:   # keep what we have, in case a later round dies
                write_record(a.json, record)
        record["summary"] = report(record["rounds_data"], models, plan, peer)
    print("\ncommands (round 1):")
    for model, sessions in record["rounds_data"][0]["sessions"].items():
        for name, s in sessions.items():
            print(f"  {model} {name}: {s['command']}" + (f"  [{s['error']}]" if "error" in s else ""))
            if s.get("config"):
                print("    config: " + s["config"].strip().replace("\n", "; "))
    for model, c in record["rounds_data"][0]["ceiling"].items():
        print(f"  {model} ceiling: {c['command']}" + ("  [failed]" if "error" in c else ""))
    if a.json:
        write_record(a.json, record)
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
