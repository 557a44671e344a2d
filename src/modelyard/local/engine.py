"""LocalEngine: an EngineCore on ONE long-lived thread (local/engine_thread), fed through an inbox.

The thread loads the model, steps the core, and exits on stop(). The event loop talks to it
only through the inbox (add, abort) and receives each step's outputs in one call_soon_threadsafe.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import logging
import queue
from pathlib import Path
from typing import Any, AsyncIterator

from ..engine.types import MAX_PENDING, EngineOutput, EngineRequest, ModelType, Usage, reads_too_slowly
from ..errors import EngineError, ModelyardError, QueueFull
from ..settings import EndpointSpec
from .chat_template import ChatTemplate
from .core import EngineCore
from .engine_thread import STOP, EngineThread
from .ffi import ContextShape, LlamaContext, LlamaModel, generation_kernels, system_info, tiled_kquant_matmul
from .footprint import Footprint, reported, vocab_of
from .grammar import Compiled, Grammars
from .prefix_cache import HostCache
from .prepare import check_ids, detokenize, prepare, prompt_ids
from .repacking import load_for_generation, repacked
from .request import Request
from .runner import LlamaCppRunner
from .scheduler import Scheduler
from .slots import SlotPool
from .workers import Workers
from .vocab_guard import VocabGuard

log = logging.getLogger("modelyard.engine")


class LocalEngine(EngineThread):
    model_type = ModelType.COMPLETIONS
    model_engine = "LLAMA_CPP"

    def __init__(self, spec: EndpointSpec, model_path: Path) -> None:
        self.spec = spec
        self.model_path = model_path
        self.model: LlamaModel | None = None
        self._init_thread()
        self._core: EngineCore | None = None
        self._sinks: dict[str, object] = {}    # request id -> its output queue's put
        self._batch_ids: set[str] = set()       # of those, the batch-priority ones
        self._broken: str | None = None
        self._host_cache = HostCache(spec.prefix_cache_mib * 2**20)
        self.footprint: Footprint | None = None     # what llama.cpp allocated, once loaded
        self.build_info: dict[str, Any] = {}   # what llama.cpp runs: SIMD features, weight buffers
        self._grammars: Grammars | None = None
        # Tokenizing, templating and the tokenizer routes run on this endpoint's own threads,
        # not the event loop's default pool (which the control plane's sync and the database
        # use too): one endpoint's long prompts never stall the rest of the process.
        self._workers = Workers(f"prepare-{spec.name}")
        self._vocab: VocabGuard[LlamaModel] = VocabGuard(self._not_running)

    # -- lifecycle (event loop) ---------------------------------------------------------

    async def start(self) -> None:
        try:
            await self._start_thread(self.spec.name)
        except asyncio.CancelledError:
            log.info("endpoint %s: stopped while loading; the engine thread closed the model and ended",
                     self.spec.name)
            raise

    def _refuse(self, req: Request) -> None:
        if req.on_end is not None:      # it computed nothing: its reservation goes back
            req.on_end(0, 0)
        req.sink(self._not_running())

    def ready_reason(self) -> str | None:
        return self._broken

    def status(self) -> dict[str, Any]:
        core = self._core
        if core is None:
            return {"in_flight": len(self._sinks)}
        sched = core.scheduler
        host = self._host_cache
        return {"in_flight": len(self._sinks), "running": len(sched.running),
                "queue_depth": len(sched.waiting) + len(sched.batch_waiting),
                "batch_queue_depth": len(sched.batch_waiting),
                "batch_running": sum(1 for r in sched.running if r.batch),
                "batch_preemptions": sched.preemptions, "slots_total": sched.slots.n,
                "slots_used": sched.slots.n_used,
                "cached_tokens": sum(len(c) for c in sched.slots.cached),
                "prefix_reused_tokens": sched.reused_tokens,
                "host_cache_entries": len(host), "host_cache_bytes": host.bytes,
                "host_cache_capacity_bytes": host.capacity, "host_cache_hits": host.hits,
                "host_cache_hit_tokens": host.hit_tokens, "host_cache_evictions": host.evictions,
                "peak_logits_rows": core.runner.peak_logits_rows,
                "peak_step_logits_rows": core.runner.peak_step_rows,
                "filler_rows": core.runner.filler_rows,
                **(self._grammars.status() if self._grammars else {}),
                **self.build_info}

    # -- requests (event loop) ----------------------------------------------------------

    async def generate(self, request: EngineRequest) -> AsyncIterator[EngineOutput]:
        if self._broken:
            raise EngineError(f"engine is broken: {self._broken}")
        self._check_running()
        # Each priority class has the room parallel + max_queue on its own: queued batch work
        # never makes an interactive request QueueFull.
        batch = request.priority == "batch"
        in_class = len(self._batch_ids) if batch else len(self._sinks) - len(self._batch_ids)
        if in_class >= self.spec.parallel + self.spec.max_queue:
            raise QueueFull(f"endpoint {self.spec.name!r} is at capacity: {in_class} {request.priority} requests "
                            f"in flight (parallel {self.spec.parallel} + max_queue {self.spec.max_queue})",
                            retry_after=1.0)
        outputs: asyncio.Queue = asyncio.Queue()
        sink = self._bounded_sink(request.request_id, outputs)
        self._sinks[request.request_id] = sink      # counted in flight (capacity) from now on
        if batch:
            self._batch_ids.add(request.request_id)
        done = True
        try:
            # Tokenizing (and rendering a chat template) a long prompt takes a while: on a worker
            # thread, so that no other stream waits for it. Only llama_decode needs the engine
            # thread; the vocabulary is read-only.
            grammar = None
            if request.constraint is not None and self._grammars is not None:
                grammar = await self._grammars.compile_async(request.constraint)
            req = await self._workers.run(self._build, request, sink, grammar)
            if request.ledger is not None:   # may raise RateLimited: before the engine sees it
                await request.ledger.reserve(req.num_prompt + req.n * req.max_tokens)
                settle, loop = request.ledger.settle, self._loop
                req.on_end = lambda prompt, output: loop.call_soon_threadsafe(settle, prompt, output)
            if self._stopped:           # stopped meanwhile: nobody would read the inbox
                if request.ledger is not None:
                    request.ledger.settle(0, 0)
                raise self._not_running()
            self._inbox.put(("add", req))
            done = False
            while True:
                item = await outputs.get()
                if isinstance(item, BaseException):
                    done = True
                    raise item
                for out in item:
                    yield out
                    if isinstance(out, Usage):
                        done = True
                        return
        finally:
            del self._sinks[request.request_id]
            self._batch_ids.discard(request.request_id)
            if not done:   # the consumer left: free the request's slots at once
                self._inbox.put(("abort", request.request_id))

    def _bounded_sink(self, request_id: str, outputs: asyncio.Queue):
        """The request's output queue's put, bounded: a consumer more than MAX_PENDING steps behind
        (a streaming client that reads slowly) would make the queue grow with every step, and the
        engine thread must never wait for one client. Past the bound the request is aborted and its
        consumer gets the error next, ahead of the output it will never read."""
        overflowed = False

        def put(item: object) -> None:
            nonlocal overflowed
            if overflowed:
                return
            if outputs.qsize() >= MAX_PENDING and not isinstance(item, BaseException):
                overflowed = True
                while not outputs.empty():
                    outputs.get_nowait()
                outputs.put_nowait(reads_too_slowly(f"{MAX_PENDING} steps of output"))
                self._inbox.put(("abort", request_id))
                return
            outputs.put_nowait(item)
        return put

    def _build(self, r: EngineRequest, sink, grammar: Compiled | None) -> Request:
        with self._vocab_use():
            return prepare(r, self.model, self._chat, context=self.spec.context, parallel=self.spec.parallel,
                           parse_special=self.spec.chat_parse_special, sink=sink, grammar=grammar)

    def _vocab_use(self) -> contextlib.AbstractContextManager[LlamaModel]:
        """Worker threads read the vocabulary while the engine thread may be closing the model
        (a stop): the close waits for every reader, and no reader starts after it (VocabGuard)."""
        return self._vocab.reading(self.model)

    def _close_model(self) -> None:
        self._vocab.close()
        if self._grammars is not None:      # its tokenizer points into the vocabulary
            self._grammars.close()
        self.model.close()

    # -- the tokenizer routes (/tokenize, /detokenize, /tokenizer_info) ----------------------
    # On worker threads like _build: the vocabulary is read-only, and a long text must not
    # stall the event loop.

    async def tokenize(self, text: str | None, messages: tuple[dict, ...] | None, add_special: bool,
                       tools: tuple[dict, ...] | None = None) -> list[int]:
        """Text as /completions tokenizes a prompt (special tokens written in it parsed), or
        `messages` (and `tools`) as /chat/completions feeds them to the model."""
        def run() -> list[int]:
            with self._vocab_use() as model:
                if messages is not None:
                    r = EngineRequest("tokenize", "", messages=messages, tools=tools)
                    return prompt_ids(r, model, self._chat, self.spec.chat_parse_special)
                return model.tokenize(text or "", add_special)
        return await self._workers.run(run)

    async def detokenize(self, ids: list[int]) -> str:
        def run() -> str:
            with self._vocab_use() as model:
                check_ids(ids, model, "tokens")
                return detokenize(model, ids)
        return await self._workers.run(run)

    async def token_strs(self, ids: list[int]) -> list[str]:
        def run() -> list[str]:
            with self._vocab_use() as model:
                check_ids(ids, model, "tokens")
                return [model.vocab_text(t) for t in ids]
        return await self._workers.run(run)

    def tokenizer_info(self) -> dict[str, Any]:
        with self._vocab_use() as model:
            return {"tokenizer_class": f"llama.cpp:{model.vocab_type}", "vocab_size": model.n_vocab,
                    "bos_token": model.bos_text or None, "eos_token": model.eos_text or None,
                    "add_bos_token": model.add_bos, "model_max_length": self.spec.context,
                    "chat_template": model.chat_template()}

    def _fail_all(self, error: EngineError) -> None:
        for put in self._sinks.values():
            put(error)

    def _deliver(self, batch: list[tuple[Request, object]]) -> None:
        for req, item in batch:
            req.sink(item)

    # -- the engine thread ----------------------------------------------------------------

    def _main(self, started: concurrent.futures.Future) -> None:
        # Running from here on, `started` cannot be cancelled under us: start() being cancelled
        # (a stop while loading) leaves it for nobody, and its set_result cannot raise.
        started.set_running_or_notify_cancel()
        try:
            # deterministic: ggml's reference kernels on this thread, the one that decodes
            # (flash attention in one order; see ffi), and repacked weights only where a
            # load-time probe finds their rows independent of the batch (local/repacking), so a
            # row's logits never depend on the rows beside it. A llama.cpp build without the
            # reference kernels: plain attention, invariant too, slower.
            deterministic = self.spec.deterministic
            fixed_order, flash_attn = generation_kernels(deterministic)
            if deterministic and not fixed_order:
                log.warning("endpoint %s: this llama.cpp build cannot pin its reference kernels to a "
                            "thread (scripts/install patches it to): plain attention, slower",
                            self.spec.name)
            self.model, layout = load_for_generation(self.model_path, deterministic, self.spec.n_threads,
                                                     flash_attn, fixed_order)
            self._chat = ChatTemplate(self.model)
            self._grammars = Grammars(self.model.ll_tokenizer, guard=self._vocab_use)
            ctx = LlamaContext(self.model, ContextShape(
                n_seq=self.spec.parallel, n_ctx_seq=self.spec.context,
                n_batch=max(self.spec.batch, self.spec.parallel + 2), n_threads=self.spec.n_threads,
                flash_attn=flash_attn))
            self.footprint = reported(self.model.size_bytes, ctx.buffers, self._host_cache.capacity,
                                      vocab_of(self.model_path), self.model.buffers)
            kernels = {"weight_repacking": repacked(self.model),
                       "flash_attention": flash_attn,
                       "fixed_order": fixed_order,
                       "tiled_kquant_matmul": tiled_kquant_matmul() and not fixed_order}
            self.build_info = {"deterministic": self.spec.deterministic, "kernels": kernels,
                               "weight_layout": layout,
                               "weight_buffers_mib": self.model.buffers, "system_info": system_info().strip()}
            # So that a report from a user's machine says which kernels ran.
            log.info("endpoint %s: deterministic=%s, kernels %s (weight layout: %s), weight buffers (MiB) %s, "
                     "llama.cpp: %s", self.spec.name, self.spec.deterministic, kernels, layout, self.model.buffers,
                     self.build_info["system_info"])
        except Exception as exc:  # any load failure marks the endpoint failed, with the reason
            if self.model is not None:      # the weights loaded, the context did not
                self._close_model()
            started.set_exception(exc if isinstance(exc, ModelyardError)
                                  else EngineError(f"cannot load {self.model_path}: {exc}"))
            return
        emit = lambda out: self._loop.call_soon_threadsafe(self._deliver, out)  # noqa: E731
        scheduler = Scheduler(SlotPool(self.spec.parallel), max(self.spec.batch, self.spec.parallel + 2),
                              self.spec.prefix_cache, self._host_cache, window=self.model.n_swa)
        self._core = EngineCore(scheduler, LlamaCppRunner(ctx, self._host_cache, fill_holes=self.model.kv_only),
                                self.model, emit)
        started.set_result(None)
        try:
            self._serve()
        except BaseException as exc:  # the engine itself broke: fail everything, say why
            self._broken = f"{type(exc).__name__}: {exc}"
            self._loop.call_soon_threadsafe(self._fail_all, EngineError(f"engine failed: {self._broken}"))
        finally:
            ctx.close()
            self._close_model()

    def _serve(self) -> None:
        core = self._core
        while True:
            block = not core.scheduler.has_work
            try:
                while True:
                    kind, arg = self._inbox.get(block=block)
                    if kind is STOP:
                        self._abort_all()
                        return
                    if kind == "add":
                        core.scheduler.add(arg)
                    else:
                        core.abort(arg)
                    block = False
            except queue.Empty:
                pass
            core.step()

    def _abort_all(self) -> None:
        sched = self._core.scheduler
        for req in [*sched.running, *sched.waiting, *sched.batch_waiting]:
            self._core.abort(req.id, self._not_running())
