"""Weightless fakes for the embedded engine's pure core (vLLM-style scheduler tests).

* FakeVocab: token id -> bytes piece. Ids 0..25 are the letters a..z, then a space, "é" and
  "€" split over several byte tokens, a two-letter token, a special and the EOG token.
* Model rows: a function of the tokens a slot's KV holds -> one logits row whose argmax is a
  scripted next token (on a deterministic, non-flat background, so logprobs are not trivial).
* FakeContext mimics ffi.LlamaContext (seq_rm, seq_cp, decode, logits_row) and simulates the
  KV of every slot as a token list. decode() checks that a token at position p in slot s finds
  exactly p tokens in s, so a scheduler that forgets a truncation or a copy, or reorders them
  wrongly, trips a KVViolation (recorded, and re-raised by Harness.check even though
  EngineCore turns it into a failed batch). FakeRunner wraps the REAL LlamaCppRunner around
  it (so the order of truncations and copies is production's) and records every batch.
* Harness: Scheduler + SlotPool + EngineCore + FakeRunner; requests are built by hand the way
  production's `prepare` builds them (as LocalEngine does); outputs are collected per request.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Iterable

import numpy as np

from modelyard.engine.types import ChoiceDelta, Constraint, EngineRequest, FinishReason, SamplingParams, TokenLogprobs, Usage
from modelyard.errors import EngineError
from modelyard.local.core import EngineCore
from modelyard.local.prepare import prepare
from modelyard.local.request import Request
from modelyard.local.prefix_cache import HostCache
from modelyard.local.runner import LlamaCppRunner
from modelyard.local.sampling import Sampler
from modelyard.local.scheduler import Batch, Scheduler
from modelyard.local.slots import SlotPool

# -- vocabulary -----------------------------------------------------------------------------

SPACE = 26
E_ACUTE = (27, 28)          # "é" = c3 a9
EURO = (29, 30, 31)         # "€" = e2 82 ac
AB = 32                     # one token, two letters: "ab"
SPECIAL = 33                # a special token that renders empty (not EOG)
EOG = 39
V = 40
CONTEXT = 4096              # the fake context: room for any prompt + max_tokens the tests use


def _pieces() -> dict[int, bytes]:
    p = {k: chr(ord("a") + k % 26).encode() for k in range(26)}
    p[SPACE] = b" "
    e, eu = "é".encode(), "€".encode()
    p[E_ACUTE[0]], p[E_ACUTE[1]] = e[:1], e[1:]
    p[EURO[0]], p[EURO[1]], p[EURO[2]] = eu[:1], eu[1:2], eu[2:]
    p[AB] = b"ab"
    p[SPECIAL] = b""
    for k in range(34, V):
        p[k] = b""
    return p


PIECES = _pieces()


def L(ch: str) -> int:
    """The token of one letter."""
    return ord(ch) - ord("a")


class FakeVocab:
    """What EngineCore (runner.Vocab) and prepare.prepare need from a model."""

    n_vocab = V

    def piece(self, token: int) -> bytes:
        return PIECES[token]

    def is_eog(self, token: int) -> bool:
        return token == EOG

    def tokenize(self, text: str, add_special: bool = True) -> list[int]:
        return [SPACE if c == " " else L(c) for c in text]

    def text(self, ids: Iterable[int]) -> str:
        return b"".join(PIECES[t] for t in ids).decode("utf-8", "replace")


def encode(text: str) -> list[int]:
    return FakeVocab().tokenize(text)


class _LLVocab:
    """The fake vocabulary as llguidance's TokenizerWrapper wants it: token bytes (specials
    marked with 0xff, llguidance's convention), the end token, and a tokenizer of bytes."""
    eos_token_id = EOG
    bos_token_id = None
    special_token_ids = list(range(SPECIAL, V))
    tokens = [PIECES[t] if t < SPECIAL else b"\xff<s%d>" % t for t in range(V)]

    def __call__(self, data: bytes) -> list[int]:
        return encode(data.decode("utf-8", "replace"))


def fake_grammars():
    """Production's Grammars over the fake vocabulary."""
    import llguidance
    from modelyard.local.grammar import Grammars
    return Grammars(lambda: llguidance.LLTokenizer(llguidance.TokenizerWrapper(_LLVocab())))


# -- the scripted "model" -------------------------------------------------------------------

Model = Callable[[tuple[int, ...]], np.ndarray]     # tokens in the slot (incl. this one) -> row
PEAK = 10.0


def background(n_seen: int) -> np.ndarray:
    """A deterministic, non-flat row: distinct values in [-2, 2] for the tokens that have
    text, well below for the empty-text ones (so top_logprobs keys never collide)."""
    row = (2.0 * np.sin(np.arange(V) * 0.37 + n_seen * 1.3)).astype(np.float32)
    row[SPECIAL:] -= 8.0
    return row


def peaked(target: int, n_seen: int = 0) -> np.ndarray:
    row = background(n_seen)
    row[target] = PEAK
    return row


def counting(history: tuple[int, ...]) -> int:
    """Next letter of the alphabet; after "z" the model ends (EOG); anything else -> "a"."""
    last = history[-1]
    if last < 25:
        return last + 1
    if last == 25:
        return EOG
    return 0


def scripted(next_token: Callable[[tuple[int, ...]], int | np.ndarray] = counting) -> Model:
    """A model whose argmax is next_token(history); next_token may also return a whole row."""
    def model(history: tuple[int, ...]) -> np.ndarray:
        out = next_token(history)
        row = np.asarray(out, np.float32).copy() if isinstance(out, np.ndarray) else peaked(out, len(history))
        row.setflags(write=False)           # logits are a view into llama.cpp: never written
        return row
    return model


def continuation(prompt: list[int], then: list[int], after: Callable[[tuple[int, ...]], int] = counting):
    """next_token that emits `then` after `prompt`, then falls back to `after`."""
    def nxt(history: tuple[int, ...]) -> int:
        n = len(history) - len(prompt)
        if tuple(history[: len(prompt)]) == tuple(prompt) and 0 <= n < len(then):
            return then[n]
        return after(history)
    return nxt


# -- context / runner -----------------------------------------------------------------------

@dataclass
class BatchRecord:
    tokens: list[int]
    positions: list[int]
    slots: list[int]
    logits: list[bool]
    truncations: list[tuple[int, int]]
    copies: list[tuple[int, int]]
    decodes: list[tuple[str, int, int]]           # (request id, choice index, row)
    prefills: list[tuple[str, int, int]]          # (request id, start, end)

    @property
    def decode_rows(self) -> list[int]:
        return [row for _, _, row in self.decodes]


class KVViolation(AssertionError):
    """The scheduler fed a token at a position its slot's KV does not match."""


class FakeContext:
    """ffi.LlamaContext without llama.cpp: the KV of each slot is the list of its tokens."""

    def __init__(self, model: Model, n_slots: int, n_batch: int) -> None:
        self.model = model
        self.n_batch = n_batch
        self.kv: list[list[int]] = [[] for _ in range(n_slots)]
        self.rows: dict[int, np.ndarray] = {}
        self.fail_next: BaseException | None = None     # raised by the next decode
        self.fail_when = None                           # slots -> bool: a decode touching them fails
        self.ops: list[tuple] = []                      # ("rm", seq, p0) / ("cp", src, dst) / ("decode", n)
        self.calls: list[list[int]] = []                # each decode's sequence ids, row by row
        self.violations: list[KVViolation] = []

    def seq_rm(self, seq: int, p0: int = 0, p1: int = -1) -> None:
        assert p1 == -1
        assert p0 >= 0
        self.ops.append(("rm", seq, p0))
        del self.kv[seq][p0:]

    n_ctx_seq = 1 << 20

    def seq_pos_max(self, seq: int) -> int:
        return len(self.kv[seq]) - 1

    def seq_cp(self, src: int, dst: int) -> None:
        # LlamaContext.seq_cp drops dst's KV first, then copies src's whole KV.
        assert src != dst
        self.ops.append(("cp", src, dst))
        self.kv[dst] = list(self.kv[src])

    def seq_state(self, seq: int) -> tuple[int, ...]:
        self.ops.append(("save", seq))
        return tuple(self.kv[seq])

    @staticmethod
    def state_nbytes(state: tuple[int, ...]) -> int:
        return 100 * len(state)          # a made-up size per token

    def set_seq_state(self, seq: int, state: tuple[int, ...]) -> None:
        self.ops.append(("restore", seq))
        self.kv[seq] = list(state)

    def decode(self, tokens, positions, seqs, logits) -> None:
        n = len(tokens)
        assert 0 < n <= self.n_batch, f"batch of {n} tokens, n_batch {self.n_batch}"
        assert len(positions) == len(seqs) == len(logits) == n
        self.ops.append(("decode", n))
        self.calls.append(list(seqs))
        self.rows = {}
        if self.fail_next is not None:
            exc, self.fail_next = self.fail_next, None
            raise exc
        if self.fail_when is not None and self.fail_when(set(seqs)):
            raise EngineError(f"llama_decode failed with code -1 on slots {sorted(set(seqs))}")
        for i, (tok, pos, s, want) in enumerate(zip(tokens, positions, seqs, logits)):
            assert 0 <= tok < V
            if pos != len(self.kv[s]):
                v = KVViolation(f"row {i}: token {tok} at position {pos} in slot {s}, whose KV "
                                f"holds {len(self.kv[s])} tokens {self.kv[s]}")
                self.violations.append(v)
                raise v
            self.kv[s].append(tok)
            if want:
                self.rows[i] = self.model(tuple(self.kv[s]))

    def logits_row(self, i: int) -> np.ndarray:
        assert i in self.rows, f"logits of batch row {i} were not requested"
        return self.rows[i]


class FakeRunner:
    """runner.Runner: records each batch, then runs the real LlamaCppRunner on a FakeContext."""

    def __init__(self, model: Model, n_slots: int, n_batch: int, host_cache: HostCache | None = None,
                 fill_holes: bool = True) -> None:
        self.ctx = FakeContext(model, n_slots, n_batch)
        self._runner = LlamaCppRunner(self.ctx, host_cache, fill_holes=fill_holes)
        self.batches: list[BatchRecord] = []
        self.raise_in_execute: BaseException | None = None   # raised before touching the KV

    def execute(self, batch: Batch, prefilled=None):
        self.batches.append(BatchRecord(
            list(batch.tokens), list(batch.positions), list(batch.slots), list(batch.logits),
            list(batch.truncations), list(batch.copies),
            [(r.id, s.index, row) for r, s, row in batch.decodes],
            [(c.request.id, c.start, c.end) for c in batch.prefills]))
        if self.raise_in_execute is not None:
            exc, self.raise_in_execute = self.raise_in_execute, None
            raise exc
        return self._runner.execute(batch, prefilled)

    def fail_next_decode(self, exc: BaseException | None = None) -> None:
        self.ctx.fail_next = exc or EngineError("llama_decode failed with code 1")

    def fail_decodes_touching(self, *slots: int) -> None:
        """Every decode whose batch holds one of these slots fails (a persistent fault)."""
        self.ctx.fail_when = lambda used: bool(used & set(slots))


# -- outputs --------------------------------------------------------------------------------

@dataclass
class Choice:
    text: str = ""
    deltas: list[str] = field(default_factory=list)
    finish: FinishReason | None = None
    logprobs: TokenLogprobs | None = None


@dataclass
class Result:
    choices: dict[int, Choice]
    usage: Usage | None
    error: BaseException | None
    items: list


def collect(items: list) -> Result:
    """Fold one request's sink items; checks the stream's shape: Usage once and last (or
    an error, last), nothing after a choice's finish reason."""
    choices: dict[int, Choice] = {}
    usage = error = None
    flat = []
    for item in items:
        assert usage is None and error is None, f"output after the end: {item!r}"
        if isinstance(item, BaseException):
            error = item
            continue
        assert isinstance(item, list) and item, item
        for out in item:
            flat.append(out)
            assert usage is None, f"output after Usage: {out!r}"
            if isinstance(out, Usage):
                usage = out
                continue
            assert isinstance(out, ChoiceDelta), out
            c = choices.setdefault(out.index, Choice())
            assert c.finish is None, f"choice {out.index}: delta after its finish"
            c.text += out.text
            c.deltas.append(out.text)
            c.finish = out.finish_reason
            if out.logprobs is not None:
                if c.logprobs is None:
                    c.logprobs = TokenLogprobs()
                c.logprobs.extend(out.logprobs)
    return Result(choices, usage, error, flat)


# -- the harness ----------------------------------------------------------------------------

class Harness:
    def __init__(self, n_slots: int = 4, step_tokens: int = 16, prefix_cache: bool = True,
                 model: Model | None = None, host_cache_bytes: int = 0, fill_holes: bool = True,
                 window: int = 0) -> None:
        self.vocab = FakeVocab()
        self.grammars = fake_grammars()
        self.n_slots = n_slots
        self.host_cache = HostCache(host_cache_bytes)
        self.runner = FakeRunner(model or scripted(), n_slots, step_tokens, self.host_cache, fill_holes)
        self.pool = SlotPool(n_slots)
        self.sched = Scheduler(self.pool, step_tokens, prefix_cache, self.host_cache, window=window)
        self.emits: list[list[tuple[Request, object]]] = []
        self.core = EngineCore(self.sched, self.runner, self.vocab, self._emit)
        self.sinks: dict[str, list] = {}
        self.requests: dict[str, Request] = {}
        self.steps = 0

    def _emit(self, out: list[tuple[Request, object]]) -> None:
        self.emits.append(out)
        for req, item in out:          # as LocalEngine._deliver does
            req.sink(item)

    def build(self, rid: str, prompt: str | list[int], *, n: int = 1, max_tokens: int = 16,
              stop: tuple[str, ...] = (), echo: bool = False, sampling: SamplingParams = SamplingParams(),
              deadline: float | None = None, constraint: Constraint | None = None,
              cache_partition: str = "", priority: str = "interactive") -> Request:
        """With the production code (prepare.prepare), as LocalEngine builds them."""
        sink = self.sinks.setdefault(rid, [])
        r = EngineRequest(rid, prompt if isinstance(prompt, str) else tuple(prompt), sampling, n=n,
                          max_tokens=max_tokens, stop=stop, echo=echo, deadline=deadline, constraint=constraint,
                          cache_partition=cache_partition, priority=priority)
        grammar = self.grammars.compile(constraint) if constraint is not None else None
        req = prepare(r, self.vocab, None, context=CONTEXT, parallel=self.n_slots, parse_special=False,
                      sink=sink.append, grammar=grammar)
        self.requests[rid] = req
        return req

    def add(self, rid: str, prompt: str | list[int], **kw) -> Request:
        req = self.build(rid, prompt, **kw)
        self.sched.add(req)
        return req

    def step(self) -> bool:
        did = self.core.step()
        if did:
            self.steps += 1
        self.check()
        return did

    def run(self, max_steps: int = 200) -> int:
        """Step until idle; returns the number of steps that did something."""
        n = 0
        while self.step():
            n += 1
            assert n < max_steps, "the engine does not converge"
        return n

    def result(self, rid: str) -> Result:
        return collect(self.sinks[rid])

    @property
    def batches(self) -> list[BatchRecord]:
        return self.runner.batches

    @property
    def kv(self) -> list[list[int]]:
        return self.runner.ctx.kv

    def check(self) -> None:
        """Invariants between steps."""
        sched, pool = self.sched, self.pool
        if self.runner.ctx.violations:
            raise self.runner.ctx.violations[0]
        # every slot the scheduler believes cached really holds those tokens (copies still
        # queued for the next batch excepted)
        pending_dst = {d for _, d in sched._copies}
        for s in range(pool.n):
            if s in pending_dst:
                continue
            c = pool.cached[s]
            assert self.kv[s][: len(c)] == c, (
                f"slot {s}: the scheduler thinks its KV holds {c}, it holds {self.kv[s]}")
        # slots held == slots of unfinished choices of running requests, all distinct
        held = [seq.slot for r in sched.running for seq in r.seqs if not seq.finished]
        assert len(held) == len(set(held)), held
        assert pool.n_free == pool.n - len(held), (pool.n_free, held)
        assert not (set(held) & pool._free)


# -- sampled (temperature) scripts ----------------------------------------------------------

def coin(*tokens: int) -> np.ndarray:
    """A row where exactly `tokens` are equally likely (everything else ~e^-30)."""
    row = np.full(V, -30.0, np.float32)
    row[list(tokens)] = 0.0
    return row


def sure(token: int) -> np.ndarray:
    """A row that any temperature <= 1 samples as `token`."""
    return coin(token)


def find_seed(row: np.ndarray, wants: list[int], temperature: float = 1.0) -> int:
    """A seed whose choice i draws wants[i] first from row (SamplingParams.for_choice)."""
    for seed in range(10_000):
        p = SamplingParams(temperature=temperature, seed=seed)
        if all(Sampler(p.for_choice(i)).sample(row).token == w for i, w in enumerate(wants)):
            return seed
    raise AssertionError(f"no seed draws {wants}")
