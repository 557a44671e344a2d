"""Embedding jobs and the one batch per step: inputs of many requests packed into one llama_decode,
each in its own sequence at a lane-aligned offset; each sequence's rows pooled and normalised.

Pure Python + numpy, so the packing is tested without a model (tests/local/test_embeddings_batch.py).
The alignment and the filler sequence are what keep a vector independent of its neighbours; see
ffi.EmbeddingContext for why.
"""

from __future__ import annotations

import time
from collections import deque
from dataclasses import dataclass, field
from typing import Callable

import numpy as np

from ..engine.types import EmbeddingResult

FILLER_TOKEN = 0        # [PAD] in BERT vocabularies; any id works, its rows are never read


@dataclass(eq=False)   # identity: a job is one request, found and removed by itself
class EmbedJob:
    """One request on the engine thread: its inputs' token ids and the vectors computed so far."""

    id: str
    inputs: list[list[int]]
    finish: Callable[[EmbeddingResult | BaseException], None]   # called once, on the engine thread
    deadline: float | None = None
    batch: bool = False    # a batch's line (issue 23): packed only into room interactive jobs leave
    arrival: float = field(default_factory=time.monotonic)
    vectors: list[tuple[float, ...] | None] = field(default_factory=list)
    next: int = 0          # inputs handed to a batch so far
    done: int = 0          # vectors computed
    tokens: int = 0        # tokens computed (what the request is charged)

    def __post_init__(self) -> None:
        self.vectors = [None] * len(self.inputs)

    @property
    def started(self) -> bool:
        return self.next > 0

    @property
    def complete(self) -> bool:
        return self.done == len(self.inputs)

    def result(self) -> EmbeddingResult:
        assert self.complete
        return EmbeddingResult(tuple(self.vectors), self.tokens)   # type: ignore[arg-type]


@dataclass
class Span:
    job: EmbedJob
    index: int       # the input's index in its request
    offset: int      # first row in the batch
    length: int


@dataclass
class Packed:
    tokens: list[int]
    positions: list[int]
    seqs: list[int]
    spans: list[Span]

    @property
    def padding(self) -> int:
        return len(self.tokens) - sum(s.length for s in self.spans)


class Packer:
    """FIFO over jobs: the head job's next inputs first, then the next job's, while the batch has
    sequences and tokens left. An input never waits behind a later one of its class, and batch
    jobs' inputs (priority "batch") take only the room interactive jobs leave: a decode is one
    step, so an interactive request waits at most for the decode under way."""

    def __init__(self, max_seqs: int, max_tokens: int, align: int) -> None:
        self.max_seqs, self.max_tokens, self.align = max_seqs, max_tokens, align
        self.filler_seq = max_seqs       # sequence ids 0..max_seqs-1 are inputs; the context has one more

    def aligned(self, n: int) -> int:
        return -(-n // self.align) * self.align

    def pack(self, jobs: deque[EmbedJob]) -> Packed | None:
        """One batch from the jobs' pending inputs; None when none is pending. The first input
        is taken whatever its length (the context holds the longest one admission lets through),
        the others while the batch stays within max_tokens."""
        out = Packed([], [], [], [])
        for job in [j for j in jobs if not j.batch] + [j for j in jobs if j.batch]:
            while job.next < len(job.inputs):
                ids = job.inputs[job.next]
                full = len(out.spans) == self.max_seqs or len(out.tokens) + self.aligned(len(ids)) > self.max_tokens
                if out.spans and full:
                    return out
                self._place(out, job, ids)
        return out if out.spans else None

    def _place(self, out: Packed, job: EmbedJob, ids: list[int]) -> None:
        seq = len(out.spans)
        out.spans.append(Span(job, job.next, len(out.tokens), len(ids)))
        out.tokens += ids
        out.positions += range(len(ids))
        out.seqs += [seq] * len(ids)
        gap = self.aligned(len(ids)) - len(ids)
        # One filler sequence for every gap: llama.cpp wants a sequence's positions non-decreasing
        # (all 0 here) and the filler's rows attend only to each other.
        out.tokens += [FILLER_TOKEN] * gap
        out.positions += [0] * gap
        out.seqs += [self.filler_seq] * gap
        job.next += 1


def pool(rows: np.ndarray, how: str) -> tuple[float, ...]:
    """One sequence's hidden states [n, d] -> its unit vector, as sentence-transformers pools and
    normalises (Pooling, then Normalize). Always the same arithmetic on the same rows, whatever
    the batch held: float64 sums, then float32 (what OpenAI's base64 carries)."""
    if how == "mean":
        v = rows.astype(np.float64).mean(axis=0)
    elif how == "cls":
        v = rows[0].astype(np.float64)
    else:                                   # "last"
        v = rows[-1].astype(np.float64)
    norm = np.linalg.norm(v)
    if norm > 0:
        v = v / norm
    return tuple(v.astype(np.float32).tolist())
