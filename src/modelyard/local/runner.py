"""Runner: executes one Batch and hands back its logits rows. The seam for fake-runner tests."""

from __future__ import annotations

from typing import Callable, Protocol

import numpy as np

from .ffi import LlamaContext
from .scheduler import Batch

Logits = Callable[[int], np.ndarray]   # batch row -> logits (valid until the next execute)


class Vocab(Protocol):
    def piece(self, token: int) -> bytes: ...
    def is_eog(self, token: int) -> bool: ...


class Runner(Protocol):
    def execute(self, batch: Batch) -> Logits: ...


class LlamaCppRunner:
    def __init__(self, ctx: LlamaContext) -> None:
        self.ctx = ctx

    def execute(self, batch: Batch) -> Logits:
        # Copies first: they were decided a step earlier, and a slot they read or write may
        # since have been freed and re-admitted (its truncation comes with this batch).
        for src, dst in batch.copies:
            self.ctx.seq_cp(src, dst)
        for slot, keep in batch.truncations:
            self.ctx.seq_rm(slot, keep)
        self.ctx.decode(batch.tokens, batch.positions, batch.slots, batch.logits)
        return self.ctx.logits_row
