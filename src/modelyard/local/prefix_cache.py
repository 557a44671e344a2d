"""Prompt KV kept in host memory beyond the slots: bounded in bytes, least recently used out.

A slot's cache lives only until another prompt takes the slot. When that happens, the KV of
its prompt-computed prefix is saved here (llama.cpp copies one sequence's cells out), and a
later prompt that shares a longer prefix with an entry than with any free slot has the entry
restored into its slot before its first chunk, so a returning chat user or a repeated
few-shot prompt skips prefill even after many other prompts went through. The restored bytes
are the computed ones, so the logits after a restore are bit-identical (tested). An entry keeps
the cache partition of the prompt that computed it and serves only that partition, as the
slots do (local/slots.py says why).

Pure bookkeeping: the runner saves and restores the bytes (`state`, opaque here) on the
engine thread; the scheduler decides which, at admission.
"""

from __future__ import annotations

import itertools
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np

from .slots import shared_prefix

# Prefixes shorter than this are not worth a host copy: recomputing them is about as fast.
MIN_TOKENS = 32


@dataclass(frozen=True, eq=False)
class Entry:
    tokens: tuple[int, ...]     # the prompt tokens whose KV `state` holds, from position 0
    state: Any                  # the saved KV (ffi.LlamaContext.seq_state)
    nbytes: int
    ids: np.ndarray             # tokens as an array, for shared_prefix
    partition: str = ""         # the only cache partition it serves


class HostCache:
    def __init__(self, capacity_bytes: int) -> None:
        self.capacity = capacity_bytes
        self._entries: OrderedDict[int, Entry] = OrderedDict()   # oldest use first
        self._ids = itertools.count()
        self.bytes = 0
        self.hits = 0           # prompts that had an entry restored
        self.hit_tokens = 0     # prompt tokens those restores saved from prefill
        self.saves = 0
        self.evictions = 0

    def __len__(self) -> int:
        return len(self._entries)

    def worth_saving(self, tokens: Sequence[int], partition: str = "") -> bool:
        """Whether a slot's prefix (of `partition`) should be saved before it is overwritten
        (called at admission, before the bytes exist): long enough, and not held already."""
        if self.capacity <= 0 or len(tokens) < MIN_TOKENS:
            return False
        ids = np.asarray(tokens, np.int64)
        return not any(e.partition == partition and len(e.ids) >= len(ids) and shared_prefix(e.ids, ids) == len(ids)
                       for e in self._entries.values())

    def best(self, prompt: Sequence[int], partition: str = "") -> tuple[Entry | None, int]:
        """The entry of `partition` sharing the longest prefix with prompt, and that length."""
        found, shared = None, 0
        ids = np.asarray(prompt, np.int64)
        for entry in self._entries.values():
            if entry.partition != partition:
                continue
            n = shared_prefix(entry.ids, ids)
            if n > shared:
                found, shared = entry, n
        return found, shared

    def use(self, entry: Entry, tokens: int) -> None:
        """An entry is being restored for a prompt that reuses `tokens` of it."""
        for key, e in self._entries.items():
            if e is entry:
                self._entries.move_to_end(key)
                break
        self.hits += 1
        self.hit_tokens += tokens

    def put(self, tokens: Sequence[int], state: Any, nbytes: int, partition: str = "") -> None:
        """Keep a saved prefix of `partition` (engine thread, after the runner copied it out)."""
        if nbytes > self.capacity:
            return
        tokens = tuple(tokens)
        ids = np.asarray(tokens, np.int64)
        # An entry of the same partition that is a prefix of this one is worth nothing more.
        for key in [k for k, e in self._entries.items() if e.partition == partition
                    and len(e.ids) <= len(ids) and shared_prefix(e.ids, ids) == len(e.ids)]:
            self._drop(key)
        while self.bytes + nbytes > self.capacity:
            self._drop(next(iter(self._entries)))
            self.evictions += 1
        self._entries[next(self._ids)] = Entry(tokens, state, nbytes, ids, partition)
        self.bytes += nbytes
        self.saves += 1

    def _drop(self, key: int) -> None:
        self.bytes -= self._entries.pop(key).nbytes
