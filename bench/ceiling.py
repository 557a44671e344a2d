"""The raw ceiling: bare batched llama_decode through modelyard's own FFI, no server.

    .venv/bin/python bench/ceiling.py [--batches 1,4,16] [--prompt 128] [--steps 64] [--json PATH]

For each batch size B (in a context shaped like a modelyard endpoint: n_seq sequences of
n_ctx_seq tokens, n_batch tokens per llama_decode, the same thread count):
  prefill   B sequences of `prompt` tokens, chunked to n_batch tokens per llama_decode,
            logits for each sequence's last token only  -> prefill tokens/s
  decode    `steps` llama_decode calls of B tokens (one per sequence, logits for all)
                                                       -> decode tokens/s, ms per step
No sampling, no detokenizing, no HTTP: what the arithmetic alone allows. bench/serve.py runs
this in a subprocess while no server is running. Prints one JSON object on stdout.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from modelyard.local.ffi import (ContextShape, LlamaContext, LlamaModel, choose_kernels, generation_kernels,
                                 system_info)
from modelyard.local.repacking import load_for_generation
from modelyard.settings import EndpointSpec

DEFAULT_MODEL = Path.home() / ".cache" / "modelyard" / "models" / "smollm2-135m.gguf"


def _prompt_tokens(model: LlamaModel, n: int) -> list[int]:
    words = ("the river carries old stones past quiet towns where people tell long stories "
             "about winter markets bright lanterns and ships that never came home").split()
    text, i = "", 0
    while True:
        ids = model.tokenize(text)
        if len(ids) >= n:
            return ids[:n]
        text += (", " if text else "") + words[i % len(words)]
        i += 1


def _clear(ctx: LlamaContext, n_seq: int) -> None:
    for s in range(n_seq):
        ctx.seq_rm(s)


def _prefill(ctx: LlamaContext, ids: list[int], b: int, n_batch: int) -> float:
    rows = [(t, pos, s, pos == len(ids) - 1) for s in range(b) for pos, t in enumerate(ids)]
    t0 = time.perf_counter()
    for i in range(0, len(rows), n_batch):
        chunk = rows[i:i + n_batch]
        ctx.decode([r[0] for r in chunk], [r[1] for r in chunk], [r[2] for r in chunk],
                   [r[3] for r in chunk])
    return time.perf_counter() - t0


def measure(model_path: Path, batches: list[int], prompt: int, steps: int, threads: int,
            n_seq: int, n_ctx_seq: int, n_batch: int, deterministic: bool = True,
            plain_attention: bool = False) -> dict:
    # The kernels an endpoint with this `deterministic` runs (see modelyard.local.engine);
    # `plain_attention`: a deterministic endpoint's on a llama.cpp build without the
    # fixed-order kernels (scripts/patches).
    choose_kernels(deterministic)
    fixed_order, flash_attn = generation_kernels(deterministic, fixed_order=not plain_attention)
    model, layout = load_for_generation(model_path, deterministic, threads, flash_attn, fixed_order)
    shape = ContextShape(n_seq=n_seq, n_ctx_seq=n_ctx_seq, n_batch=max(n_batch, n_seq), n_threads=threads,
                         flash_attn=flash_attn)
    ctx = LlamaContext(model, shape)
    try:
        ids = _prompt_tokens(model, prompt)
        _prefill(ctx, ids[:32], 1, shape.n_batch)      # warm up the thread pool and caches
        _clear(ctx, n_seq)
        out = []
        for b in batches:
            b = min(b, n_seq)
            _clear(ctx, n_seq)
            t_pf = _prefill(ctx, ids, b, shape.n_batch)
            tok = ids[-1]
            t0 = time.perf_counter()
            for step in range(steps):
                ctx.decode([tok] * b, [prompt + step] * b, list(range(b)), [True] * b)
            t_dec = time.perf_counter() - t0
            out.append({"batch": b, "prefill_tokens": b * prompt, "prefill_s": t_pf,
                        "prefill_tok_s": b * prompt / t_pf, "decode_steps": steps, "decode_s": t_dec,
                        "decode_tok_s": b * steps / t_dec, "ms_per_step": 1000 * t_dec / steps})
        _clear(ctx, n_seq)
        return {"model": str(model_path), "threads": threads, "n_seq": n_seq, "n_ctx_seq": n_ctx_seq,
                "n_batch": shape.n_batch, "prompt": prompt, "deterministic": deterministic,
                "attention": "flash, fixed order" if fixed_order else "plain" if deterministic else "flash",
                "weight_layout": layout, "weight_buffers_mib": model.buffers, "system_info": system_info(), "results": out}
    finally:
        ctx.close()
        model.close()


def main(argv: list[str] | None = None) -> int:
    spec = EndpointSpec(name="bench")
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", type=Path, default=DEFAULT_MODEL)
    p.add_argument("--batches", default="1,4,16")
    p.add_argument("--prompt", type=int, default=128, help="prompt tokens per sequence")
    p.add_argument("--steps", type=int, default=64, help="timed decode steps")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--n-seq", type=int, default=16)
    p.add_argument("--n-ctx-seq", type=int, default=1024)
    p.add_argument("--n-batch", type=int, default=spec.batch,
                   help=f"tokens per llama_decode (modelyard's endpoint default: {spec.batch})")
    p.add_argument("--deterministic", choices=("true", "false"), default="true",
                   help="the kernels of an endpoint with this setting (default: true, modelyard's default)")
    p.add_argument("--plain-attention", action="store_true",
                   help="with --deterministic true: plain attention, as on a llama.cpp build without "
                        "the fixed-order kernels (the A/B for scripts/patches)")
    p.add_argument("--json", type=Path, help="also write the result here")
    a = p.parse_args(argv)
    batches = [int(x) for x in a.batches.split(",") if x.strip()]
    if a.prompt + a.steps > a.n_ctx_seq:
        p.error("--prompt + --steps must fit --n-ctx-seq")
    res = measure(a.model, batches, a.prompt, a.steps, a.threads, a.n_seq, a.n_ctx_seq, a.n_batch,
                  a.deterministic == "true", a.plain_attention)
    text = json.dumps(res)
    if a.json:
        a.json.write_text(text)
    print(text)
    print(f"attention: {res['attention']}", file=sys.stderr)
    for r in res["results"]:
        print(f"B={r['batch']:3d}  prefill {r['prefill_tok_s']:8.1f} tok/s   decode {r['decode_tok_s']:8.1f} tok/s"
              f"  ({r['ms_per_step']:.1f} ms/step)", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
