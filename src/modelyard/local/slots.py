"""The pool of llama.cpp sequence ids ("slots"), each remembering the tokens its KV holds.

A finished sequence's KV stays in its slot as a cache: a new prompt that shares a prefix
with it (a chat history, a system prompt) takes that slot and skips the shared prefill, if it
is of the same cache partition (engine.types.EngineRequest.cache_partition): a prompt that
skipped prefill answers sooner, so reuse across tenants would tell one tenant, token by token,
what another's prompts begin with.
"""

from __future__ import annotations

import itertools
from typing import Sequence

import numpy as np


# What one more run of busy slot ids is worth in prompt tokens. With a KV stream per sequence,
# llama.cpp puts only consecutive sequence ids into one ubatch (llama_batch_allocr::split_equal),
# and each ubatch reads all the weights again: a decode step over slots {0, 2, 3} is two passes.
# On 2 threads that cost a step of two interactive decodes and a batch one 25-30 ms instead of
# about 20 (bench/batch_priority, 2026-12-07, AVX-512), on every step the request lives; a prompt
# token reused saves about 4 ms once. So a slot that keeps the busy ids in one run is taken over
# one whose cache would spare fewer than this many more tokens.
RUN_TOKENS = 32


def common_prefix(a: Sequence[int], b: Sequence[int]) -> int:
    """Length of the common prefix of two token lists (the slots' caches grow every step, so they
    stay lists: converting one to an array costs more than this loop)."""
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n


def shared_prefix(a: np.ndarray, b: np.ndarray) -> int:
    """common_prefix of two token arrays, vectorised (the host cache's entries are immutable
    arrays, compared with every admitted prompt)."""
    n = min(len(a), len(b))
    diff = np.flatnonzero(a[:n] != b[:n])
    return int(diff[0]) if len(diff) else n


class SlotPool:
    def __init__(self, n: int) -> None:
        self.n = n
        self.cached: list[list[int]] = [[] for _ in range(n)]   # tokens in each slot's KV
        # How many leading cached tokens were computed as prompt chunks of >= 2 tokens. Only
        # those are reused: a token decoded alone takes another kernel path (the logits differ
        # in the last bits), so reusing it would make output depend on what ran before.
        self.reusable: list[int] = [0] * n
        # Whose prompt each slot's cache holds: it is reused only by the same partition.
        self.partition: list[str] = [""] * n
        # The shortest prefix a slot's KV may be cut to (0: any). A prefix longer than a model's
        # sliding window, restored from host memory, holds only the window's cells in those
        # layers (llama.cpp saves no cell out of the window): cut shorter, the positions its next
        # tokens attend to would be missing (Scheduler._floor).
        self.floor: list[int] = [0] * n
        self._free = set(range(n))
        self._last_used = [0] * n
        self._clock = itertools.count(1)

    @property
    def n_free(self) -> int:
        return len(self._free)

    @property
    def n_used(self) -> int:
        return self.n - len(self._free)

    def acquire(self, prompt: Sequence[int], n: int, reuse: bool, partition: str = "") -> tuple[list[int], int]:
        """Take n free slots for a prompt of cache partition `partition`: the first is the one
        whose cache (of that partition) shares the longest prefix with it (if reuse). Returns
        (slots, prefix tokens already in the first slot). The slots keep their old partition
        until `claim`: the scheduler saves what they held first."""
        assert n <= len(self._free)
        first, shared = None, 0
        if reuse:
            first, shared = max(((s, self.reusable_prefix(s, prompt, partition)) for s in self._free),
                                key=lambda t: (t[1] - RUN_TOKENS * self._new_runs(t[0]), -t[0]))
        if not shared:
            first = min(self._free, key=lambda s: (self._new_runs(s), self._value(s), s))
        slots = [first] + self._take_rest(first, n - 1)
        for s in slots:
            self._free.discard(s)
            self._last_used[s] = next(self._clock)
        return slots, shared

    def _new_runs(self, slot: int) -> int:
        """How taking free `slot` changes the number of runs of consecutive busy ids: -1 (it
        joins two), 0 (it extends one), 1 (it starts one); see RUN_TOKENS."""
        busy = [0 <= s < self.n and s not in self._free for s in (slot - 1, slot + 1)]
        return 1 - sum(busy)

    def reusable_prefix(self, slot: int, prompt: Sequence[int], partition: str) -> int:
        """How much of `prompt` the slot's cache could spare it (of the same partition only)."""
        if self.partition[slot] != partition:
            return 0
        return min(self.reusable[slot], common_prefix(self.cached[slot], prompt))

    def claim(self, slot: int, partition: str) -> None:
        """What the slot computes from now on belongs to `partition` (after acquire, once the
        scheduler has saved or kept what the slot held)."""
        self.partition[slot] = partition

    def _take_rest(self, first: int, k: int) -> list[int]:
        left = set(self._free) - {first}
        out = []
        for _ in range(k):
            s = self._cheapest(left)
            left.discard(s)
            out.append(s)
        return out

    def _value(self, slot: int) -> tuple[int, int]:
        # What evicting this slot's cache would lose: empty first, then least recently used.
        return (1 if self.cached[slot] else 0, self._last_used[slot])

    def _cheapest(self, candidates: set[int]) -> int:
        # Lowest id among equals keeps busy ids dense, so llama.cpp's per-stream batch
        # splitting (consecutive sequence ids per ubatch) makes fewer ubatches.
        return min(candidates, key=lambda s: (self._value(s), s))

    def release(self, slot: int) -> None:
        assert slot not in self._free
        self._free.add(slot)
        self._last_used[slot] = next(self._clock)

    def truncate(self, slot: int, keep: int) -> None:
        assert keep == 0 or keep >= self.floor[slot], f"slot {slot}: cut to {keep}, below {self.floor[slot]}"
        del self.cached[slot][keep:]
        self.reusable[slot] = min(self.reusable[slot], keep)
        if keep == 0:
            self.floor[slot] = 0

    def cuttable(self, slot: int, keep: int) -> int:
        """`keep` if the slot's KV may be cut to it, else 0 (recompute from the start)."""
        return keep if keep >= self.floor[slot] else 0

    def forget(self, slot: int) -> None:
        self.cached[slot] = []
        self.reusable[slot] = 0

    def append_decoded(self, slot: int, token: int) -> None:
        self.cached[slot].append(token)

    def extend_prompt(self, slot: int, tokens: list[int]) -> None:
        if len(tokens) >= 2 and self.reusable[slot] == len(self.cached[slot]):
            self.reusable[slot] += len(tokens)
        self.cached[slot].extend(tokens)

    def copy(self, src: int, dst: int) -> None:
        self.cached[dst] = list(self.cached[src])
        self.reusable[dst] = self.reusable[src]
        self.partition[dst] = self.partition[src]
        self.floor[dst] = self.floor[src]
