"""Structured output on the embedded engine: a Constraint -> an llguidance grammar -> a token
mask per choice, applied to the raw logits row before anything else touches it.

llguidance (MIT; Microsoft's, also behind llama.cpp's and vLLM's structured outputs) computes the
mask from its own view of the vocabulary in tens of microseconds and fails loudly: an invalid
or unsupported schema is an error we turn into a 400, never an unconstrained answer.

- Compiling happens off the engine thread, on each endpoint's own compilers (COMPILERS
  threads), with a time bound, before the request is admitted; the request awaits it; compiled grammars are cached by the constraint's canonical
  source, and each choice gets its own copy (matchers hold the parse state).
- JSON has fixed separators and no free whitespace, so a small model cannot loop on newlines
  inside an object.
- Logprobs are those of the constrained distribution: the masked row is what the sampler sees.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import json
import logging
import threading
import time
from collections import OrderedDict
from typing import Callable, ContextManager

import llguidance
import numpy as np
from llguidance.gbnf_to_lark import gbnf_to_lark

from ..engine.types import Constraint
from ..errors import InvalidRequest, QueueFull

log = logging.getLogger("modelyard.grammar")

# Compact JSON with one space after separators (how models write it); no whitespace elsewhere.
JSON_OPTIONS = {"whitespace_flexible": False, "item_separator": ", ", "key_separator": ": "}
COMPILE_TIMEOUT = 5.0          # seconds of one compile; past it the request is a 400 (LIMITS bound the work)
COMPILERS = 4                  # compiles at once per endpoint (llguidance drops the GIL while compiling)
QUEUE_TIMEOUT = 10.0           # seconds a compile may wait for a free compiler; past it a 503
CACHE_SIZE = 256               # compiled grammars kept per endpoint
POLL = 0.05                    # seconds between looks at a compile in progress
# llguidance's resource limits, so that an adversarial grammar errors out instead of running long.
LIMITS = llguidance.LLParserLimits(max_grammar_size=2_000_000, initial_lexer_fuel=2_000_000,
                                   step_lexer_fuel=500_000, max_lexer_states=250_000)


def grammar_text(c: Constraint) -> str:
    """llguidance's grammar for a constraint (no tokenizer needed); errors name the field."""
    try:
        if c.kind == "json_schema":
            return llguidance.LLMatcher.grammar_from_json_schema(
                c.source, overrides={**JSON_OPTIONS, "lenient": not c.strict})
        if c.kind == "regex":
            return llguidance.LLMatcher.grammar_from_regex(c.source)
        if c.kind == "choice":
            # Lark string literals take JSON's escapes, so json.dumps writes each choice exactly.
            alternatives = " | ".join(json.dumps(choice) for choice in json.loads(c.source))
            return llguidance.LLMatcher.grammar_from_lark(f"start: {alternatives}\n")
        if c.kind == "lark":
            return llguidance.LLMatcher.grammar_from_lark(c.source)
        if c.kind == "gbnf":
            return llguidance.LLMatcher.grammar_from_lark(gbnf_to_lark(c.source))
    except Exception as exc:  # noqa: BLE001 - the converters raise bare Exception for a bad grammar
        raise InvalidRequest(f"{c.field} cannot be used: {exc}", param=c.field) from None
    raise InvalidRequest(f"{c.field}: unknown constraint kind {c.kind!r}", param=c.field)


class Grammars:
    """One endpoint's grammar compiler: llguidance's view of the vocabulary (built on first use,
    about a second for a 50k vocabulary) and the compiled grammars, cached. Thread-safe: worker
    threads compile while the engine thread masks."""

    def __init__(self, make_tokenizer: Callable[[], "llguidance.LLTokenizer"],
                 guard: Callable[[], ContextManager[object]] = contextlib.nullcontext) -> None:
        self._make_tokenizer = make_tokenizer
        # held around each compile: the tokenizer points into the model's vocabulary, so the
        # model's owner (LocalEngine._vocab_use) must not close it under a compile in progress
        self._guard = guard
        self._tokenizer: llguidance.LLTokenizer | None = None
        self.mask_words = 0            # int32 words of one mask: llguidance's vocabulary / 32
        self._lock = threading.Lock()
        self._cache: OrderedDict[tuple, llguidance.LLMatcher] = OrderedDict()
        self._pool = concurrent.futures.ThreadPoolExecutor(COMPILERS, thread_name_prefix="grammar")
        # counters for the status and /metrics (metrics.GRAMMAR_COUNTERS)
        self.requests = 0
        self.compiled = 0
        self.cache_hits = 0
        self.compile_seconds = 0.0
        self.failed = 0
        self.masks = 0
        self.mask_seconds = 0.0

    @property
    def tokenizer(self) -> "llguidance.LLTokenizer":
        with self._lock:
            if self._tokenizer is None:
                self._tokenizer = self._make_tokenizer()
                self.mask_words = (self._tokenizer.vocab_size + 31) // 32
            return self._tokenizer

    def matchers(self, c: Constraint, n: int) -> list["Matcher"]:
        """One fresh matcher per choice; InvalidRequest if the constraint cannot be compiled."""
        return self.compile(c).matchers(n)

    def compile(self, c: Constraint) -> "Compiled":
        """The constraint compiled (from the cache, or now: InvalidRequest if it cannot be).
        Blocks the calling thread while a compile runs (tests, tools); the server awaits
        `compile_async` instead."""
        compiled = self._cached(c)
        if compiled is None:
            job = self._submit(c)
            while True:
                try:
                    compiled = job.future.result(timeout=POLL)
                    break
                except concurrent.futures.TimeoutError:
                    job.check(c)
            self._keep(c, compiled)
        return Compiled(compiled, self)

    async def compile_async(self, c: Constraint) -> "Compiled":
        """`compile` for the event loop: the compile runs on this endpoint's compilers and the
        request waits for it as a coroutine. It used to wait on a worker thread of the loop's
        default pool (cpu + 4 threads), polling for up to 15 s: a few slow grammars held every
        such thread, and tokenizing, templating and the control plane's sync (the same pool)
        stalled with them."""
        compiled = self._cached(c)
        if compiled is None:
            job = self._submit(c)
            waiting = asyncio.wrap_future(job.future)
            try:
                while True:
                    done, _ = await asyncio.wait({waiting}, timeout=POLL)
                    if done:
                        compiled = waiting.result()
                        break
                    job.check(c)
            except BaseException:
                # the request gave up (time bound, queue, client gone): the compile may still
                # end, in an error nobody awaits any more; read it then, so that asyncio does
                # not log "Future exception was never retrieved"
                waiting.add_done_callback(lambda f: f.cancelled() or f.exception())
                raise
            self._keep(c, compiled)
        return Compiled(compiled, self)

    def _cached(self, c: Constraint) -> "llguidance.LLMatcher | None":
        with self._lock:
            self.requests += 1
            compiled = self._cache.get((c.kind, c.source, c.strict))
            if compiled is not None:
                self._cache.move_to_end((c.kind, c.source, c.strict))
                self.cache_hits += 1
            return compiled

    def _keep(self, c: Constraint, compiled: "llguidance.LLMatcher") -> None:
        with self._lock:
            self._cache[(c.kind, c.source, c.strict)] = compiled
            while len(self._cache) > CACHE_SIZE:
                self._cache.popitem(last=False)

    def _submit(self, c: Constraint) -> "_Job":
        """A compile on this endpoint's compilers. COMPILE_TIMEOUT counts from when it starts,
        so a slow grammar costs its own request a 400 and never another's; a compile that cannot
        even start within QUEUE_TIMEOUT (every compiler busy) is a 503 to retry (_Job.check)."""
        job = _Job(time.monotonic(), self)
        job.future = self._pool.submit(job.run, c)
        return job

    def _compile(self, c: Constraint) -> "llguidance.LLMatcher":
        text = grammar_text(c)
        with self._guard():
            tokenizer = self.tokenizer
            start = time.perf_counter()
            matcher = llguidance.LLMatcher(tokenizer, text, log_level=0, limits=LIMITS)
            self.compile_seconds += time.perf_counter() - start
        if matcher.is_error():
            self.failed += 1
            raise InvalidRequest(f"{c.field} cannot be used: {matcher.get_error()}", param=c.field)
        warnings = matcher.get_grammar_warnings()
        if warnings:     # only without strict: the keywords named are ignored
            log.warning("%s: %s", c.field, "; ".join(warnings))
        self.compiled += 1
        return matcher

    def close(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)

    def status(self) -> dict[str, float | int]:
        return {"grammar_requests": self.requests, "grammar_compiled": self.compiled, "grammar_cache_hits": self.cache_hits,
                "grammar_failed": self.failed, "grammar_compile_seconds": round(self.compile_seconds, 6),
                "grammar_masks": self.masks, "grammar_mask_seconds": round(self.mask_seconds, 6)}


class Compiled:
    """A compiled grammar: each choice of a request gets its own Matcher (parse state) from it."""

    __slots__ = ("_compiled", "_grammars")

    def __init__(self, compiled: "llguidance.LLMatcher", grammars: Grammars) -> None:
        self._compiled, self._grammars = compiled, grammars

    def matchers(self, n: int) -> list["Matcher"]:
        return [Matcher(self._compiled.deep_copy(), self._grammars) for _ in range(n)]


class _Job:
    """One compile on the pool: when it was submitted and when it started (set by the worker)."""

    def __init__(self, submitted: float, grammars: Grammars) -> None:
        self.submitted = submitted
        self.started: float | None = None
        self.grammars = grammars
        self.future: concurrent.futures.Future      # set by Grammars._submit

    def run(self, c: Constraint) -> "llguidance.LLMatcher":
        self.started = time.monotonic()
        return self.grammars._compile(c)

    def check(self, c: Constraint) -> None:
        """Raise if the compile has run past COMPILE_TIMEOUT, or has waited past QUEUE_TIMEOUT
        for a compiler; else return (keep waiting)."""
        now = time.monotonic()
        if self.started is not None and now - self.started > COMPILE_TIMEOUT:
            self.grammars.failed += 1
            raise InvalidRequest(f"{c.field}: the grammar did not compile within {COMPILE_TIMEOUT:g} s; "
                                 "simplify it", param=c.field) from None
        if self.started is None and now - self.submitted > QUEUE_TIMEOUT:
            self.future.cancel()
            raise QueueFull(f"{c.field}: every grammar compiler is busy; retry shortly", retry_after=1.0)


class Matcher:
    """One choice's parse state: the mask for its next token, and the tokens it took."""

    __slots__ = ("_m", "_bits", "_stats")

    def __init__(self, m: "llguidance.LLMatcher", stats: Grammars) -> None:
        self._m = m
        self._bits: np.ndarray | None = None
        self._stats = stats

    def masked(self, row: np.ndarray) -> np.ndarray:
        """A copy of `row` with every token the grammar does not allow next at -inf."""
        start = time.perf_counter()
        if self._bits is None:
            self._bits = np.zeros(self._stats.mask_words, np.int32)
        self._m.unsafe_compute_mask_ptr(self._bits.ctypes.data, self._bits.nbytes)
        allowed = np.unpackbits(self._bits.view(np.uint8), bitorder="little")[:len(row)].view(bool)
        if len(allowed) < len(row):     # rows past llguidance's vocabulary: never allowed
            allowed = np.concatenate([allowed, np.zeros(len(row) - len(allowed), bool)])
        # copyto with a mask beats np.where 1.5-3x on real masks, which are mostly closed (JSON
        # structure) or mostly open (string contents); measured on smollm2's and gemma3's rows.
        out = np.full(len(row), -np.inf, np.float32)
        np.copyto(out, row, where=allowed)
        self._stats.masks += 1
        self._stats.mask_seconds += time.perf_counter() - start
        return out

    def consume(self, token: int) -> bool:
        return bool(self._m.consume_token(token))

    @property
    def done(self) -> bool:
        """The grammar is complete and allows nothing more (only the end of generation)."""
        return bool(self._m.is_stopped())

    @property
    def error(self) -> str:
        return self._m.get_error()
