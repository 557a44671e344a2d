"""Embedding jobs and the one batch per step: inputs of many requests packed into one llama_decode,
each in its own sequence: tight, where the attention kernel computes a row in one order wherever
its keys fall (ffi.tile_invariant_attention), else at a lane-aligned offset and, under flash
attention, never across a tile boundary it could start on; each sequence's rows pooled and
normalised.

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
    step, so an interactive request waits at most for the decode under way.

    `tile` (0: none) is the KV tile of the flash-attention kernel the context runs
    (ffi.FLASH_ATTN_TILE). That kernel folds keys into a row's softmax one tile at a time, so a
    sequence's vector depends on how its tokens fall into tiles: an input that fits in the rest
    of the current tile goes there (at a lane multiple), any other starts on a tile boundary, and
    a decode has at least one tile of tokens (below that ggml takes another kernel). Then every
    input meets the same tiles, at the same lanes, alone or in any batch. With the tile-invariant
    kernel (ffi.tile_invariant_attention) none of that is needed: align 1, no tile, tight."""

    def __init__(self, max_seqs: int, max_tokens: int, align: int, tile: int = 0) -> None:
        if tile % align:
            raise ValueError(f"the attention tile ({tile}) must be a multiple of the lane alignment ({align})")
        self.max_seqs, self.max_tokens, self.align, self.tile = max_seqs, max_tokens, align, tile
        self.filler_seq = max_seqs       # sequence ids 0..max_seqs-1 are inputs; the context has one more

    def aligned(self, n: int) -> int:
        return -(-n // self.align) * self.align

    def capacity(self, longest: int) -> int:
        """Tokens a decode may need: the longest input, aligned, and at least one tile."""
        return max(self.aligned(longest), self.tile)

    def start(self, at: int, n: int) -> int:
        """Where an input of n tokens starts in a batch that holds `at` tokens (a lane multiple),
        unless a hole takes it: the gap an earlier input left when it skipped to a boundary goes
        to a later input short enough (`pack`). FIFO decides which inputs a decode holds; the
        holes only decide where in it they sit."""
        if self.tile and at % self.tile and at % self.tile + n > self.tile:
            return at + self.tile - at % self.tile      # it would cross the boundary: start on it
        return at

    def pack(self, jobs: deque[EmbedJob]) -> Packed | None:
        """One batch from the jobs' pending inputs; None when none is pending. The first input
        is taken whatever its length (the context holds the longest one admission lets through),
        the others while the batch stays within max_tokens."""
        out = Packed([], [], [], [])
        holes: list[list[int]] = []     # [start, end) of filler an input skipped: later ones may fit
        for job in [j for j in jobs if not j.batch] + [j for j in jobs if j.batch]:
            while job.next < len(job.inputs):
                ids = job.inputs[job.next]
                if out.spans and len(out.spans) == self.max_seqs:
                    return self._topped_up(out)
                hole = next((h for h in holes if h[1] - h[0] >= len(ids)), None)
                if hole is not None:    # inside one tile (holes never span a boundary): no growth
                    self._write(out, hole[0], job, ids)
                    hole[0] += self.aligned(len(ids))
                    continue
                at = self.start(len(out.tokens), len(ids))
                if out.spans and at + self.aligned(len(ids)) > self.max_tokens:
                    return self._topped_up(out)
                if at > len(out.tokens):
                    holes.append([len(out.tokens), at])
                self._fill(out, at - len(out.tokens))
                self._write(out, at, job, ids)
        return self._topped_up(out) if out.spans else None

    def _write(self, out: Packed, at: int, job: EmbedJob, ids: list[int]) -> None:
        """The input at `at`: on filler already there (a hole), or appended with its lane gap."""
        self._fill(out, at + self.aligned(len(ids)) - len(out.tokens))
        end = at + len(ids)
        out.spans.append(Span(job, job.next, at, len(ids)))
        out.tokens[at:end] = ids
        out.positions[at:end] = range(len(ids))
        out.seqs[at:end] = [len(out.spans) - 1] * len(ids)
        job.next += 1

    def _topped_up(self, out: Packed) -> Packed:
        self._fill(out, self.tile - len(out.tokens))
        return out

    def _fill(self, out: Packed, gap: int) -> None:
        # One filler sequence for every gap: llama.cpp wants a sequence's positions non-decreasing
        # (all 0 here) and the filler's rows attend only to each other.
        if gap > 0:
            out.tokens += [FILLER_TOKEN] * gap
            out.positions += [0] * gap
            out.seqs += [self.filler_seq] * gap


# Inputs the load-time probe packs alone and together (tokens): inputs that cross a tile boundary
# from inside one, gaps and an input that fills one, a decode shorter than a tile when alone.
PROBE_LENGTHS = (20, 70, 3, 45, 9, 130)


def invariant(packer: Packer, encode: Callable[[Packed], np.ndarray], ids: list[int], longest: int) -> bool:
    """Whether `encode` (one llama_decode of a packed batch -> its rows) gives each probe input
    (PROBE_LENGTHS, at most `longest` tokens, cycling `ids`) bit for bit the same rows alone as
    packed with the others: the check, at load, that the kernels compute as the packing assumes
    (ffi.FLASH_ATTN_TILE, simd_lanes) on this CPU with this llama.cpp."""
    inputs = [(ids * (n // len(ids) + 1))[:min(n, longest)] for n in PROBE_LENGTHS]

    def rows(job: EmbedJob) -> dict[int, np.ndarray]:
        out: dict[int, np.ndarray] = {}
        while (packed := packer.pack(deque([job]))) is not None:
            computed = encode(packed)
            for s in packed.spans:
                out[s.index] = computed[s.offset:s.offset + s.length]
        return out

    together = rows(EmbedJob("probe", inputs, finish=lambda _: None))
    alone = [rows(EmbedJob("probe", [x], finish=lambda _: None))[0] for x in inputs]
    return all(np.array_equal(a, together[i]) for i, a in enumerate(alone))


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
