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


# With a KV stream per sequence, llama.cpp cuts a batch into ubatches of CONSECUTIVE sequence ids
# (llama_batch_allocr::split_equal, sequential), and each ubatch reads all the weights again. A
# slot between two decoding ones (its request finished, or it is prefilling this step) cut the
# step's decode call in two: 16-row steps took 67 ms, 15 rows with one hole 78 ms (smollm2, AVX-512,
# c=16: a sixth of the steps). A filler row in the hole (a throwaway token at the end of that
# slot's KV, no logits, removed right after) costs one row (about 4 ms) and keeps the call whole.
# Only runs of one slot are filled: a row costs about what the split does, so two rows gain nothing.
FILLED_RUN = 1
# llama.cpp pads the keys a ubatch attends over to a multiple of this (llama_kv_cache::get_n_kv, at
# least 256), over the longest of the ubatch's sequences: a filler whose slot holds more would make
# every row of the call attend over more (masked) keys.
KV_PAD = 256


def fillable_holes(slots: list[int], run: int = FILLED_RUN) -> list[int]:
    """The slots missing between consecutive entries of the sorted `slots` (a step's decode
    rows), in runs of at most `run` slots: those whose filler rows keep the decode one ubatch."""
    out = []
    for a, b in zip(slots, slots[1:]):
        if 1 < b - a <= run + 1:
            out.extend(range(a + 1, b))
    return out


class LlamaCppRunner:
    """One llama_decode per prompt chunk, then one for all decode tokens.

    Why not one call for the whole batch: with a KV stream per sequence, llama.cpp splits a
    batch into ubatches holding the same number of tokens from each sequence, so a prompt
    chunk beside a decode token lost its first token to a one-token piece, which takes
    another kernel path, and the output changed with load (max |logit diff| 0.41 on a
    291-token prompt). llama.cpp evaluates such a batch as several graphs anyway, so the
    separate calls cost about nothing.
    """

    def __init__(self, ctx: LlamaContext, host_cache: HostCache | None = None, fill_holes: bool = False) -> None:
        self.ctx = ctx
        self.host_cache = host_cache
        # Filler rows (FILLED_RUN) where the model's memory is a KV cache alone (ffi.LlamaModel.
        # kv_only): a sequence's cells are full below its end and empty above (LlamaContext), so
        # a filler takes the cell the slot's next token would take and gives it back, and the
        # slot's KV is as before, cell for cell (cell order is the order flash attention sums in).
        self.fill_holes = fill_holes
        self.filler_rows = 0        # filler rows computed, in all
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
        n_decode = len(batch.decodes)  # decode rows come first in a batch, in slot order
        at = self._decode_rows(batch, n_decode) if n_decode else []
        return lambda row: kept[row] if row >= n_decode else self.ctx.logits_row(at[row])

    def _save(self, slot: int, prefix: tuple[int, ...], partition: str) -> None:
        assert self.host_cache is not None
        self.ctx.seq_rm(slot, len(prefix))   # only the prompt-computed prefix is worth keeping
        try:
            state = self.ctx.seq_state(slot)
        except EngineError:   # a cache that could not be filled is a miss later, not a failure
            return
        self.host_cache.put(prefix, state, self.ctx.state_nbytes(state), partition)

    def _decode_rows(self, batch: Batch, n: int) -> list[int]:
        """The step's decode rows (batch rows 0..n-1) in one llama_decode, with filler rows in
        the holes worth filling; returns each decode row's row in that call."""
        fillers = self._fillers(batch, n)
        if not fillers:
            self._decode(batch, range(n))
            return list(range(n))
        # (slot, token, position, logits, decode row or -1): a filler's token is any token, its
        # row is thrown away. Slot order, as the scheduler sorts decode rows.
        rows = [(batch.slots[i], batch.tokens[i], batch.positions[i], batch.logits[i], i) for i in range(n)]
        rows += [(slot, batch.tokens[0], pos, False, -1) for slot, pos in fillers]
        rows.sort(key=lambda r: r[0])
        self.peak_logits_rows = max(self.peak_logits_rows, sum(batch.logits[:n]))
        try:
            self.ctx.decode([r[1] for r in rows], [r[2] for r in rows], [r[0] for r in rows], [r[3] for r in rows])
        finally:
            for slot, pos in fillers:     # even after a failure: the slot holds what it held
                self.ctx.seq_rm(slot, pos)
        self.filler_rows += len(fillers)
        at = [0] * n
        for j, r in enumerate(rows):
            if r[4] >= 0:
                at[r[4]] = j
        return at

    def _fillers(self, batch: Batch, n: int) -> list[tuple[int, int]]:
        """(slot, position) of the filler rows for this step's n decode rows: each at the end of
        its slot's KV, where it fits in the slot's context and adds no keys to the call."""
        holes = fillable_holes(batch.slots[:n]) if self.fill_holes else []
        if not holes:
            return []
        longest = -(-(max(batch.positions[:n]) + 1) // KV_PAD) * KV_PAD
        out = []
        for slot in holes:
            pos = self.ctx.seq_pos_max(slot) + 1
            if pos < self.ctx.n_ctx_seq and pos < longest:
                out.append((slot, pos))
        return out

    def _decode(self, batch: Batch, rows: range) -> None:
        s = slice(rows.start, rows.stop)
        self.peak_logits_rows = max(self.peak_logits_rows, sum(batch.logits[s]))
        self.ctx.decode(batch.tokens[s], batch.positions[s], batch.slots[s], batch.logits[s])
