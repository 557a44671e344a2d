"""Whether a generation endpoint keeps llama.cpp's repacked weights (CPU_REPACK).

Repacked kernels compute a decode's rows in groups: a GEMM over each group of 4 rows (16 first,
on AVX-512), a GEMV for the rest. So a row takes the GEMM or the GEMV depending on how many rows
its decode has, which load decides. Whether that changes its result is a property of one quant
type's kernels on one CPU, and it was measured (issue 26, AVX-512 EPYC, every row's logits of a
240-token prompt decoded whole and in chunks of 2 to 128; the same on an AVX2-only build): Q4_0's
GEMV and GEMM agree bit for bit, so its rows never depend on their batch. Q4_K's did not in stock
llama.cpp (gemma3-270m: 216-238 of 240 rows differed whenever a chunk was not a multiple of 4
rows): its GEMV summed a super-block in int32 before scaling, its GEMMs scale and accumulate each
pair of sub-blocks in float, so the roundings differed. scripts/patches/ggml-cpu-q4_K-gemv-order
.patch makes the GEMV round as the GEMMs do, and its rows agree too.

A deterministic endpoint still does not assume either way, because another llama.cpp or another
CPU's kernels may differ again; it asks the kernels, once per model file and context shape per
process (load_for_generation): the same prompt decoded whole and in chunks that send its rows
through every path, every row's logits compared bit for bit. It keeps the repacked weights
(1.1-1.8x the plain layout's speed, docs/performance.md) where they all agree, and reloads the
file in the plain layout, which computes each row alone, where one differs. The invariance
matrix (tests/engine) checks the outcome under real load on whatever CPU runs it.
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np

from ..errors import EngineError
from .ffi import ContextShape, LlamaContext, LlamaModel

log = logging.getLogger("modelyard.engine")

REPACK_BUFFER = "CPU_REPACK"
PROBE_TEXT = "The river carries old stones past quiet towns where people tell long stories. "
PROBE_TOKENS = 24
# Rows per decode that send a row through each path: all 24 at once (AVX-512's 16-row GEMM, then
# 4-row ones), 4 (the 4-row GEMM alone), 5 (a 4-row GEMM and a GEMV), 3 and 2 (the GEMV alone).
# Never 1: the scheduler never decodes a one-token prompt chunk (scheduler._add_prefill), and a
# decode step's rows go through the same kernels as a prompt chunk's.
PROBE_CHUNKS = (PROBE_TOKENS, 4, 5, 3, 2)
assert all(PROBE_TOKENS % c != 1 for c in PROBE_CHUNKS)

# Verdicts, once per process: {(model file and its stat, threads, flash attention, fixed order): agree}
_VERDICTS: dict[tuple, bool] = {}


def repacked(model: LlamaModel) -> bool:
    return REPACK_BUFFER in model.buffers


def rows_agree(model: LlamaModel, n_threads: int, flash_attn: bool) -> bool:
    """Whether every row's logits come out the same however a prompt is cut into decodes, on the
    CALLING thread's kernels (call it on the thread that will decode). About 80 token-rows of
    prefill: 0.1-0.5 s on the store's models."""
    ids = model.tokenize(PROBE_TEXT * 8)[:PROBE_TOKENS]
    if len(ids) < PROBE_TOKENS:
        raise EngineError(f"the repacking probe's text gives {len(ids)} tokens, under {PROBE_TOKENS}")
    ctx = LlamaContext(model, ContextShape(n_seq=1, n_ctx_seq=2 * PROBE_TOKENS, n_batch=PROBE_TOKENS,
                                           n_threads=n_threads, flash_attn=flash_attn))
    try:
        first: np.ndarray | None = None
        for chunk in PROBE_CHUNKS:
            ctx.seq_rm(0)
            rows = []
            for i in range(0, PROBE_TOKENS, chunk):
                part = ids[i:i + chunk]
                ctx.decode(part, list(range(i, i + len(part))), [0] * len(part), [True] * len(part))
                rows.extend(ctx.logits_row(j).copy() for j in range(len(part)))
            got = np.stack(rows)
            if first is None:
                first = got
            elif not np.array_equal(got, first):
                return False
        return True
    finally:
        ctx.close()


def load_for_generation(path: Path, deterministic: bool, n_threads: int, flash_attn: bool,
                        fixed_order: bool) -> tuple[LlamaModel, str]:
    """The model loaded for a generation engine, and what decided its weights' layout ("fast
    kernels" for deterministic = false; for deterministic: "nothing to repack", "probe passed",
    "probe failed"). Call it on the engine thread, after ffi.generation_kernels."""
    if not deterministic:
        return LlamaModel(path, repack=True), "fast kernels"
    st = path.stat()        # a file replaced at the same path is probed again
    key = (str(path), st.st_size, st.st_mtime_ns, n_threads, flash_attn, fixed_order)
    if _VERDICTS.get(key) is False:
        return LlamaModel(path, repack=False), "probe failed"
    model = LlamaModel(path, repack=True)
    if not repacked(model):
        return model, "nothing to repack"
    agree = _VERDICTS.get(key)
    if agree is None:
        try:
            agree = _VERDICTS[key] = rows_agree(model, n_threads, flash_attn)
        except BaseException:
            model.close()
            raise
        log.info("%s: repacked rows %s on this CPU (load-time probe)", path.name,
                 "agree with any batch" if agree else "depend on their batch: plain layout")
    if agree:
        return model, "probe passed"
    model.close()
    return LlamaModel(path, repack=False), "probe failed"
