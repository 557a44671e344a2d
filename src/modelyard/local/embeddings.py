"""EmbeddingEngine: pooled, normalised embeddings from llama.cpp on ONE long-lived engine thread.

The same shape as LocalEngine (loop.py), for an encoder: requests are tokenized and checked on a
worker thread, admitted against a bound (parallel + max_queue requests), and handed to the engine
thread as EmbedJobs. Each step packs pending inputs of any number of requests into one
llama_decode (embeddings_batch.Packer), pools each input's own rows, and finishes the jobs that are
complete. Only the engine thread touches the llama context (why: loop.py's docstring).

Endpoint settings, as an encoder reads them: `context` caps one input's tokens (at most the
model's trained length), `parallel` is the inputs per llama_decode, `batch` the tokens per
llama_decode (an input longer than that runs alone: a non-causal sequence cannot be split).
Attention is ggml's flash attention, which skips the other sequences' keys a tile at a time.
`deterministic = false` packs inputs tight. `deterministic = true` packs them tight too where
this llama.cpp build computes the tiled kernel in one order wherever a row's keys fall
(ffi.tile_invariant_attention, on the engine thread); else so that each input meets the same
tiles at the same lanes alone or in any batch (embeddings_batch.Packer: about 1.3x the tokens);
else with plain attention. The load-time probe decides, and status() says which ("attention").
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import queue
import time
from collections import deque
from pathlib import Path
from typing import Any, AsyncIterator

from ..engine.types import EmbeddingRequest, EmbeddingResult, EngineOutput, EngineRequest, ModelType
from ..errors import ContextOverflow, DeadlineExceeded, EngineError, InvalidRequest, ModelyardError, QueueFull
from ..settings import EndpointSpec
from .embeddings_batch import EmbedJob, Packed, Packer, invariant, pool
from .engine_thread import STOP, EngineThread
from .ffi import FLASH_ATTN_TILE, EmbeddingContext, LlamaModel, simd_lanes, system_info, tile_invariant_attention
from .footprint import Footprint, reported, vocab_of
from .vocab_guard import VocabGuard

log = logging.getLogger("modelyard.engine")
# Sequence ids a llama context takes (llama_max_parallel_sequences); one is the filler's.
MAX_SEQ = 256
# The load-time invariance probe's verdicts: {(model file and its stat, packing, attention, context): passed}
_PROBED: dict[tuple, bool] = {}


class EmbeddingEngine(EngineThread):
    model_type = ModelType.EMBEDDINGS
    model_engine = "LLAMA_CPP"

    def __init__(self, spec: EndpointSpec, model_path: Path) -> None:
        self.spec = spec
        self.model_path = model_path
        self.model: LlamaModel | None = None
        self.pooling = ""
        self.context = 0                 # the longest input, in tokens (after load)
        # "flash-tile-invariant" (tight packing), "flash" (lanes and tiles) or "plain": the first
        # the load-time probe passes on a deterministic endpoint; "flash" when deterministic = false
        self.attention = ""
        self.footprint: Footprint | None = None     # what llama.cpp allocated, once loaded
        self._affixes: tuple[list[int], list[int]] = ([], [])   # what tokenize adds: [CLS] / [SEP]
        self._init_thread()
        self._vocab: VocabGuard[LlamaModel] = VocabGuard(self._not_running)
        self._packer: Packer | None = None
        self._jobs: deque[EmbedJob] = deque()       # engine thread only
        self._broken: str | None = None
        self._in_flight = 0                          # event loop only
        # Written by the engine thread, read by status(): plain ints.
        self._counts = {"queue_depth": 0, "running": 0, "slots_used": 0, "inputs_total": 0,
                        "tokens_total": 0, "padding_tokens_total": 0, "decodes_total": 0}

    # -- lifecycle (event loop) ---------------------------------------------------------

    async def start(self) -> None:
        await self._start_thread(self.spec.name)

    def _refuse(self, job) -> None:
        job.finish(self._not_running())

    def ready_reason(self) -> str | None:
        return self._broken

    def status(self) -> dict[str, Any]:
        packer = self._packer
        limits = ({"context": self.context, "max_inputs_per_decode": packer.max_seqs,
                   "max_tokens_per_decode": packer.max_tokens, "alignment": packer.align,
                   "attention": self.attention, "attention_tile": packer.tile,
                   "deterministic": self.spec.deterministic}
                  if packer is not None else {})
        return {"in_flight": self._in_flight, **self._counts, **limits}

    # -- requests (event loop) ----------------------------------------------------------

    async def generate(self, request: EngineRequest) -> AsyncIterator[EngineOutput]:
        raise InvalidRequest(f"endpoint {self.spec.name!r} is an embeddings endpoint: it serves "
                             "/embeddings, not completions or chat", param="model")
        yield  # pragma: no cover - makes this an async generator, as the protocol has it

    async def embed(self, request: EmbeddingRequest) -> EmbeddingResult:
        if self._broken:
            raise EngineError(f"engine is broken: {self._broken}")
        self._check_running()
        capacity = self.spec.parallel + self.spec.max_queue
        if self._in_flight >= capacity:
            raise QueueFull(f"endpoint {self.spec.name!r} is at capacity: {self._in_flight} requests in "
                            f"flight (parallel {self.spec.parallel} + max_queue {self.spec.max_queue})",
                            retry_after=1.0)
        self._in_flight += 1
        job: EmbedJob | None = None
        reserved = False
        try:
            # Tokenizing 2,048 inputs takes a while: never on the event loop.
            inputs = await asyncio.to_thread(self._tokenize, request)
            if self._stopped:
                raise self._not_running()
            if request.ledger is not None:     # may raise RateLimited, before any work
                await request.ledger.reserve(sum(map(len, inputs)))
                reserved = True
            done: asyncio.Future = self._loop.create_future()
            job = EmbedJob(request.request_id, inputs, self._finisher(done), request.deadline,
                           batch=request.priority == "batch")
            self._inbox.put(("add", job))
            try:
                return await done
            except asyncio.CancelledError:      # the client left: drop its pending inputs now
                self._inbox.put(("abort", job))
                raise
        finally:
            self._in_flight -= 1
            if reserved:
                request.ledger.settle(job.tokens if job is not None else 0, 0)

    def _finisher(self, done: asyncio.Future):
        loop = self._loop

        def settle(outcome: EmbeddingResult | BaseException) -> None:
            if done.done():                     # cancelled meanwhile
                return
            if isinstance(outcome, BaseException):
                done.set_exception(outcome)
            else:
                done.set_result(outcome)
        return lambda outcome: loop.call_soon_threadsafe(settle, outcome)

    def _tokenize(self, r: EmbeddingRequest) -> list[list[int]]:
        """Token ids per input, checked: a bad request costs no engine step (worker thread).
        The model is held (VocabGuard) one input at a time: an unload or a delete meanwhile
        waits for at most one input's tokenizing, then this request gets the stop's error."""
        with self._vocab.reading(self.model) as model:
            n_embd = model.n_embd
        if r.dimensions is not None and r.dimensions != n_embd:
            raise InvalidRequest(f"dimensions is {r.dimensions}, but {self.spec.name!r} cannot reduce its "
                                 f"vectors: it returns {n_embd} dimensions (omit dimensions)",
                                 param="dimensions")
        if not r.inputs:
            raise InvalidRequest("input is empty: send a string, a list of strings or token lists", param="input")
        return [self._input_ids(i, x, r.truncate) for i, x in enumerate(r.inputs)]

    def _input_ids(self, i: int, x: str | tuple[int, ...], truncate: bool) -> list[int]:
        model = self.model
        if isinstance(x, str):
            if not x:
                raise InvalidRequest(f"input[{i}] is an empty string", param="input")
            with self._vocab.reading(model):
                ids = model.tokenize(x)
        else:
            ids = list(x)
            if not ids:
                raise InvalidRequest(f"input[{i}] is an empty token list", param="input")
            bad = [t for t in ids if not 0 <= t < model.n_vocab]
            if bad:
                raise InvalidRequest(f"input[{i}] has token {bad[0]}, outside the vocabulary "
                                     f"(0..{model.n_vocab - 1})", param="input")
        if len(ids) <= self.context:
            return ids
        if not truncate:
            raise ContextOverflow(f"input[{i}] is {len(ids)} tokens long, more than the {self.context} "
                                  f"tokens this endpoint takes per input (truncate: true cuts it)", param="input")
        if not isinstance(x, str):
            return ids[:self.context]
        head, tail = self._affixes      # a cut text keeps [CLS] ... [SEP], as its library truncates
        return ids[:self.context - len(tail)] + tail

    # -- the engine thread ----------------------------------------------------------------

    def _main(self, started: concurrent.futures.Future) -> None:
        started.set_running_or_notify_cancel()
        try:
            ctx = self._load()
        except Exception as exc:  # any load failure marks the endpoint failed, with the reason
            if self.model is not None:
                self._close_model()
            started.set_exception(exc if isinstance(exc, ModelyardError)
                                  else EngineError(f"cannot load {self.model_path}: {exc}"))
            return
        started.set_result(None)
        try:
            self._serve(ctx)
        except BaseException as exc:  # the engine itself broke: fail everything, say why
            self._broken = f"{type(exc).__name__}: {exc}"
            self._fail_all(EngineError(f"engine failed: {self._broken}"))
        finally:
            ctx.close()
            self._close_model()

    def _close_model(self) -> None:
        self._vocab.close()         # waits for the worker thread tokenizing an input, if any
        self.model.close()

    def _load(self) -> EmbeddingContext:
        # Plain weight layout: repacked kernels compute rows in groups (see ffi.LlamaModel).
        model = self.model = LlamaModel(self.model_path, repack=False)
        if model.pooling is None:
            raise EngineError(f"{self.model_path} declares no pooling: it is not an embedding model "
                              "(serve it as a completions endpoint)")
        if model.causal:
            # Causal embedders (last-token pooling over a KV cache) need a cache per sequence,
            # cleared between inputs: not built. Say so instead of computing something else.
            raise EngineError(f"{self.model_path} is a causal model: the embedded embeddings engine "
                              "serves non-causal encoders (BERT and its kin)")
        self.pooling = model.pooling
        self.context = min(self.spec.context, model.n_ctx_train)
        bare, full = model.tokenize("x", add_special=False), model.tokenize("x")
        at = full.index(bare[0])
        self._affixes = (full[:at], full[at + len(bare):])
        exact = self.spec.deterministic
        packer, ctx = self._packed_context(exact)
        self.footprint = reported(model.size_bytes, ctx.buffers, vocab=vocab_of(self.model_path))
        self._packer = packer
        log.info("endpoint %s: embeddings, %s pooling, %d dimensions, %d tokens per input, %d inputs and "
                 "%d tokens per decode, %s attention, deterministic=%s, llama.cpp: %s", self.spec.name,
                 self.pooling, model.n_embd, self.context, packer.max_seqs, packer.max_tokens,
                 self.attention, exact, system_info().strip())
        return ctx

    def _packed_context(self, exact: bool) -> tuple[Packer, EmbeddingContext]:
        """The packing and the context this engine runs (on the engine thread: the kernel switch
        is the thread's). Deterministic: the first that the load-time probe passes, fastest
        first: tight on the tile-invariant flash attention (where this build has the switch), at
        lanes and tiles on stock flash attention (another llama.cpp, a CPU whose kernel sums
        otherwise: about 1.3x the tokens), at lanes on plain attention (slower for batched
        inputs); each refusal is said in the log, status() names the one kept, and if all fail,
        the load does."""
        if not exact:
            self.attention = "flash"
            return self._context(align=1, tile=0, flash_attn=True)
        lanes = simd_lanes()
        # (status name, what the log calls it, lanes, tile, flash attention)
        tries = [("flash", "flash attention", lanes, FLASH_ATTN_TILE, True),
                 ("plain", "plain attention", lanes, 0, False)]
        if tile_invariant_attention(True):
            tries.insert(0, ("flash-tile-invariant", "tile-invariant flash attention", 1, 0, True))
        for i, (attention, said, align, tile, flash) in enumerate(tries):
            tile_invariant_attention(attention == "flash-tile-invariant")
            packer, ctx = self._context(align=align, tile=tile, flash_attn=flash)
            if self._probe(packer, ctx, attention):
                self.attention = attention
                return packer, ctx
            ctx.close()
            if i + 1 < len(tries):
                log.warning("endpoint %s: %s failed the load-time invariance probe on this CPU and llama.cpp "
                            "build; %s instead", self.spec.name, said, tries[i + 1][1])
        raise EngineError(f"{self.model_path}: an input's vector depends on its batch on this CPU and "
                          "llama.cpp build (load-time probe); serve it with deterministic = false")

    def _context(self, align: int, tile: int, flash_attn: bool) -> tuple[Packer, EmbeddingContext]:
        packer = Packer(min(self.spec.parallel, MAX_SEQ - 1), self.spec.batch, align, tile)
        capacity = packer.capacity(max(self.spec.batch, self.context))   # holds the longest input
        return packer, EmbeddingContext(self.model, packer.max_seqs + 1, capacity, self.spec.n_threads, flash_attn)

    def _probe(self, packer: Packer, ctx: EmbeddingContext, attention: str) -> bool:
        """embeddings_batch.invariant on this context: about 8 small decodes, ~0.2 s for minilm, once
        per process for a model file and a packing (a reload reuses the verdict). A decode that
        fails closes the context (nobody else holds it yet)."""
        st = self.model_path.stat()      # a file replaced at the same path is probed again
        key = (str(self.model_path), st.st_size, st.st_mtime_ns, packer.align, packer.tile, attention,
               self.context)
        if key not in _PROBED:
            ids = self.model.tokenize("the quick brown fox jumps over a lazy dog", add_special=False)
            try:
                _PROBED[key] = invariant(packer, lambda p: ctx.encode(p.tokens, p.positions, p.seqs), ids,
                                         self.context)
            except BaseException:
                ctx.close()
                raise
        return _PROBED[key]

    def _serve(self, ctx: EmbeddingContext) -> None:
        while self._drain(block=not self._jobs):
            self._expire_deadlines()
            packed = self._packer.pack(self._jobs)
            if packed is not None:
                self._step(ctx, packed)
            self._count_jobs()

    def _drain(self, block: bool) -> bool:
        """Apply what the inbox holds (waiting for one message when idle); False on stop."""
        try:
            while True:
                kind, arg = self._inbox.get(block=block)
                if kind is STOP:
                    self._fail_all(self._not_running())
                    return False
                if kind == "add":
                    self._jobs.append(arg)
                elif arg in self._jobs:         # abort: the waiter is gone, nobody to tell
                    self._jobs.remove(arg)
                block = False
        except queue.Empty:
            return True

    def _step(self, ctx: EmbeddingContext, packed: Packed) -> None:
        """One llama_decode for the packed inputs; pool each one's rows; finish complete jobs."""
        jobs = list(dict.fromkeys(span.job for span in packed.spans))
        self._counts["slots_used"] = len(packed.spans)
        try:
            rows = ctx.encode(packed.tokens, packed.positions, packed.seqs)
        except EngineError as exc:      # only this batch's requests fail; the next step goes on
            for job in jobs:
                self._finish(job, exc)
            return
        finally:
            self._counts["slots_used"] = 0
        for span in packed.spans:
            span.job.vectors[span.index] = pool(rows[span.offset:span.offset + span.length], self.pooling)
            span.job.done += 1
            span.job.tokens += span.length
        c = self._counts
        c["inputs_total"] += len(packed.spans)
        c["tokens_total"] += len(packed.tokens) - packed.padding
        c["padding_tokens_total"] += packed.padding
        c["decodes_total"] += 1
        for job in jobs:
            if job.complete:
                self._finish(job, job.result())

    def _finish(self, job: EmbedJob, outcome: EmbeddingResult | BaseException) -> None:
        if job in self._jobs:
            self._jobs.remove(job)
        job.finish(outcome)

    def _expire_deadlines(self) -> None:
        now = time.monotonic()
        for job in [j for j in self._jobs if j.deadline is not None and now >= j.deadline]:
            self._finish(job, DeadlineExceeded(
                f"request {job.id} exceeded its deadline after {now - job.arrival:.1f}s"))

    def _count_jobs(self) -> None:
        started = sum(1 for j in self._jobs if j.started)
        self._counts["running"], self._counts["queue_depth"] = started, len(self._jobs) - started

    def _fail_all(self, error: ModelyardError) -> None:
        for job in list(self._jobs):
            self._finish(job, error)
