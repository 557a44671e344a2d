"""LlamaCppRunner's filler rows on the real llama.cpp (smollm2's Q4_1, a plain KV cache): a decode
call with a filler in the one-slot hole between its sequences gives every row bit for bit the logits
it gives without, and the hole's slot then goes on exactly as if nothing had been there. Models
whose memory is not one plain KV cache (gemma3's sliding-window layers) get no fillers."""

from __future__ import annotations

import os

import numpy as np
import pytest

from modelyard import settings as settings_mod
from modelyard.local.ffi import ContextShape, LlamaContext, LlamaModel
from modelyard.local.runner import LlamaCppRunner
from modelyard.local.scheduler import Batch
from modelyard.store import ModelStore
from testkit.kernels import on_a_thread

pytestmark = pytest.mark.model

PROMPTS = ("The river carries old stones past quiet towns where people",
           "Once upon a time",
           "In the beginning the lantern makers of the northern valley sold")


def _store() -> ModelStore:
    return ModelStore(settings_mod.load(env=os.environ).store_dir, progress=False)


def _run(model: LlamaModel, fill: bool) -> tuple[list[np.ndarray], int, list[int]]:
    """Slots 0-2 prefilled; three steps decode slots 0 and 2 while slot 1 (the hole) waits, then
    slot 1 decodes with them. Returns every logits row, the fillers computed and the KV ends."""
    ctx = LlamaContext(model, ContextShape(n_seq=4, n_ctx_seq=256, n_batch=64, n_threads=1, flash_attn=True))
    try:
        runner = LlamaCppRunner(ctx, fill_holes=fill)
        ids = [model.tokenize(p) for p in PROMPTS]
        nxt, pos = {}, {}
        for slot, p in enumerate(ids):
            ctx.decode(p, list(range(len(p))), [slot] * len(p), [False] * (len(p) - 1) + [True])
            nxt[slot], pos[slot] = int(np.argmax(ctx.logits_row(len(p) - 1))), len(p)
        rows = []
        for step in range(4):
            batch = Batch()
            for slot in ((0, 2) if step < 3 else (0, 1, 2)):
                batch.decodes.append((None, None, batch.add(nxt[slot], pos[slot], slot, True)))
            logits = runner.execute(batch)
            for row, slot in enumerate(batch.slots):
                out = logits(row).copy()
                rows.append(out)
                nxt[slot], pos[slot] = int(np.argmax(out)), pos[slot] + 1
        return rows, runner.filler_rows, [ctx.seq_pos_max(s) for s in range(4)]
    finally:
        ctx.close()


def test_a_filler_changes_no_row_and_leaves_its_slot_as_it_was():
    model = LlamaModel(_store().resolve("smollm2-135m"))
    try:
        assert model.plain_kv
        plain, plain_fillers, plain_ends = on_a_thread(lambda: _run(model, fill=False), fixed=True)
        filled, fillers, ends = on_a_thread(lambda: _run(model, fill=True), fixed=True)
    finally:
        model.close()
    assert (plain_fillers, fillers) == (0, 3)          # one per step with slot 1 waiting
    assert ends == plain_ends                          # no filler cell left behind
    assert len(filled) == len(plain) == 9
    for i, (a, b) in enumerate(zip(plain, filled)):
        assert np.array_equal(a, b), f"row {i}: logits differ with a filler in the call"


def test_a_sliding_window_model_gets_no_fillers():
    model = LlamaModel(_store().resolve("gemma3-270m"))
    try:
        assert not model.plain_kv
    finally:
        model.close()
