"""What the host prefix cache relies on for a model with sliding-window layers (gemma3-270m, a
window of 512), on the real llama.cpp: a saved prefix longer than the window, restored into a slot
and cut at its last position, goes on bit for bit as the slot that computed it does; cut shorter,
it does not (llama.cpp saves no cell out of the window), which is why Scheduler._floor
refuses that restore (and tests/local/test_prefix_cache_fake.py checks the rule)."""

from __future__ import annotations

import os

import numpy as np
import pytest

from modelyard import settings as settings_mod
from modelyard.local.ffi import ContextShape, LlamaContext, LlamaModel
from modelyard.store import ModelStore
from testkit.kernels import on_a_thread

pytestmark = pytest.mark.model

TEXT = "the river carries old stones past quiet towns where people tell stories. " * 60
ENTRY = 600          # tokens saved: past the window
CHUNK = 64


def test_a_restored_entry_longer_than_the_window_goes_on_only_from_its_end():
    model = LlamaModel(ModelStore(settings_mod.load(env=os.environ).store_dir, progress=False).resolve("gemma3-270m"))
    try:
        assert 0 < model.n_swa < ENTRY - 40
        ids = model.tokenize(TEXT)[:ENTRY + 10]
        assert len(ids) == ENTRY + 10

        def measure() -> dict[int, tuple[np.ndarray, np.ndarray]]:
            ctx = LlamaContext(model, ContextShape(n_seq=3, n_ctx_seq=1024, n_batch=CHUNK, n_threads=1,
                                                   flash_attn=True))
            try:
                def run(slot: int, start: int, end: int) -> np.ndarray:
                    for i in range(start, end, CHUNK):
                        part = ids[i:min(end, i + CHUNK)]
                        ctx.decode(part, list(range(i, i + len(part))), [slot] * len(part), [True] * len(part))
                    return ctx.logits_row(len(part) - 1).copy()
                run(0, 0, ENTRY)
                state = ctx.seq_state(0)               # as the runner saves a prefix
                out = {}
                for slot, keep in ((1, ENTRY - 1), (2, ENTRY - 40)):
                    ctx.set_seq_state(slot, state)
                    ctx.seq_rm(slot, keep)
                    restored = run(slot, keep, ENTRY + 10)
                    ctx.seq_rm(0, keep)                # the slot that computed it, cut alike
                    out[keep] = restored, run(0, keep, ENTRY + 10)
                return out
            finally:
                ctx.close()
        out = on_a_thread(measure, fixed=True)
    finally:
        model.close()
    restored, computed = out[ENTRY - 1]
    assert np.array_equal(restored, computed), "cut at its last position, the restored entry differs"
    restored, computed = out[ENTRY - 40]
    assert not np.array_equal(restored, computed), (
        "cut 40 tokens short, the restored entry gives the same logits: llama.cpp now saves the cells "
        "out of the window, and Scheduler._floor could allow any cut")
