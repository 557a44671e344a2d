"""Runner: executes one Batch and hands back its logits rows. The seam for fake-runner tests."""

from __future__ import annotations

from typing import Callable, Protocol

import numpy as np

from ..errors import EngineError
from .ffi import LlamaContext
from .prefix_cache import HostCache
from .scheduler import Batch, PrefillChunk

Logits = Callable[[int], np.ndarray]   # batch row -> logits (valid until the next execute)
# Called as each prompt chunk's llama_decode returns, before the step's next call: the core
# samples a finished prompt's first token and sends it then (see EngineCore.step).
Prefilled = Callable[[PrefillChunk, Logits], None]


class Vocab(Protocol):
    def piece(self, token: int) -> bytes: ...
    def is_eog(self, token: int) -> bool: ...


class Runner(Protocol):
    def execute(self, batch: Batch, prefilled: Prefilled | None = None) -> Logits: ...


class LlamaCppRunner:
    """One llama_decode per prompt chunk, then one for all decode tokens.

    Why not one call for the whole batch: with a KV stream per sequence, llama.cpp splits a
    batch into ubatches holding the same number of tokens from each sequence, so a prompt
    chunk beside a decode token lost its first token to a one-token piece, which takes
    another kernel path, and the output changed with load (max |logit diff| 0.41 on a
    291-token prompt). llama.cpp evaluates such a batch as several graphs anyway, so the
    separate calls cost about nothing.
    """

    def __init__(self, ctx: LlamaContext, host_cache: HostCache | None = None) -> None:
        self.ctx = ctx
        self.host_cache = host_cache
        self.peak_logits_rows = 0   # the most logits rows one llama_decode asked for (memory)
        self.peak_step_rows = 0     # the most prompt logits rows one step copied and held (memory)

    def execute(self, batch: Batch, prefilled: Prefilled | None = None) -> Logits:
        # Copies first: they were decided a step earlier, and a slot they read or write may
        # since have been freed and re-admitted (its truncation comes with this batch). Saves
        # next (a copy's target holds what the slot pool says only after the copy), then
        # restores and truncations, which overwrite what the saves read.
        for src, dst in batch.copies:
            self.ctx.seq_cp(src, dst)
        for slot, prefix, partition in batch.saves:
            self._save(slot, prefix, partition)
        for slot, entry in batch.restores:
            self.ctx.set_seq_state(slot, entry.state)
        for slot, keep in batch.truncations:
            self.ctx.seq_rm(slot, keep)
        kept: dict[int, np.ndarray] = {}
        for chunk in batch.prefills:   # their rows' logits are copied before the next call
            rows = range(chunk.first_row, chunk.first_row + chunk.end - chunk.start)
            self._decode(batch, rows)
            kept.update((r, self.ctx.logits_row(i).copy()) for i, r in enumerate(rows) if batch.logits[r])
            if prefilled is not None:
                prefilled(chunk, kept.__getitem__)
        self.peak_step_rows = max(self.peak_step_rows, len(kept))
        n_decode = len(batch.decodes)  # decode rows come first in a batch
        if n_decode:
            self._decode(batch, range(n_decode))
        return lambda row: kept[row] if row >= n_decode else self.ctx.logits_row(row)

    def _save(self, slot: int, prefix: tuple[int, ...], partition: str) -> None:
        assert self.host_cache is not None
        self.ctx.seq_rm(slot, len(prefix))   # only the prompt-computed prefix is worth keeping
        try:
            state = self.ctx.seq_state(slot)
        except EngineError:   # a cache that could not be filled is a miss later, not a failure
            return
        self.host_cache.put(prefix, state, self.ctx.state_nbytes(state), partition)

    def _decode(self, batch: Batch, rows: range) -> None:
        s = slice(rows.start, rows.stop)
        self.peak_logits_rows = max(self.peak_logits_rows, sum(batch.logits[s]))
        self.ctx.decode(batch.tokens[s], batch.positions[s], batch.slots[s], batch.logits[s])
