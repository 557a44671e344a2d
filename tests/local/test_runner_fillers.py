"""LlamaCppRunner's filler rows on the real llama.cpp: a decode call with a filler in the one-slot
hole between its sequences gives every row bit for bit the logits it gives without, and the hole's
slot then goes on exactly as if nothing had been there. On smollm2 (one KV cache) and gemma3, whose
sliding-window layers have a cache of their own: there the hole's slot holds more positions than
the window (512), so the filler's cell is one a masked position could have taken."""

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

LONG = "the river carries old stones past quiet towns where people tell stories. " * 50
# Slot 1 (the hole) holds more positions than gemma3's window, and so does slot 0: a filler never
# makes the call attend over more keys than its rows already do (runner.KV_PAD).
PROMPTS = ("In the beginning, " + LONG, "Once upon a time, " + LONG,
           "In the beginning the lantern makers of the northern valley sold")
CHUNK = 64


def _store() -> ModelStore:
    return ModelStore(settings_mod.load(env=os.environ).store_dir, progress=False)


def _run(model: LlamaModel) -> dict[bool, tuple[list[np.ndarray], int, list[int]]]:
    """Slots 0-2 prefilled once; then, without fillers and again with them from the same KV (the
    steps' tokens dropped in between), three steps decode slots 0 and 2 while slot 1 (the hole)
    waits and a fourth decodes all three. For each: every logits row, the fillers, the KV ends."""
    ctx = LlamaContext(model, ContextShape(n_seq=4, n_ctx_seq=1024, n_batch=CHUNK, n_threads=1, flash_attn=True))
    try:
        ids = [model.tokenize(p) for p in PROMPTS]
        first = {}
        for slot, p in enumerate(ids):
            for i in range(0, len(p), CHUNK):
                part = p[i:i + CHUNK]
                ctx.decode(part, list(range(i, i + len(part))), [slot] * len(part), [False] * (len(part) - 1) + [True])
            first[slot] = int(np.argmax(ctx.logits_row(len(part) - 1)))
        out = {}
        for fill in (False, True):
            runner = LlamaCppRunner(ctx, fill_holes=fill)
            nxt, pos = dict(first), {slot: len(p) for slot, p in enumerate(ids)}
            rows = []
            for step in range(4):
                batch = Batch()
                for slot in ((0, 2) if step < 3 else (0, 1, 2)):
                    batch.decodes.append((None, None, batch.add(nxt[slot], pos[slot], slot, True)))
                logits = runner.execute(batch)
                for row, slot in enumerate(batch.slots):
                    rows.append(logits(row).copy())
                    nxt[slot], pos[slot] = int(np.argmax(rows[-1])), pos[slot] + 1
            out[fill] = rows, runner.filler_rows, [ctx.seq_pos_max(s) for s in range(4)]
            for slot, p in enumerate(ids):
                ctx.seq_rm(slot, len(p))
        return out
    finally:
        ctx.close()


@pytest.mark.parametrize("name", ["smollm2-135m", "gemma3-270m"])
def test_a_filler_changes_no_row_and_leaves_its_slot_as_it_was(name):
    model = LlamaModel(_store().resolve(name))
    try:
        assert model.kv_only
        assert len(model.tokenize(PROMPTS[1])) > 600        # past gemma3's window of 512
        runs = on_a_thread(lambda: _run(model), fixed=True)
        (plain, plain_fillers, plain_ends), (filled, fillers, ends) = runs[False], runs[True]
    finally:
        model.close()
    assert (plain_fillers, fillers) == (0, 3)          # one per step with slot 1 waiting
    assert ends == plain_ends                          # no filler cell left behind
    assert len(filled) == len(plain) == 9
    for i, (a, b) in enumerate(zip(plain, filled)):
        assert np.array_equal(a, b), f"row {i}: logits differ with a filler in the call"

