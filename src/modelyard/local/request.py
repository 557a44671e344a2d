"""Request (one prompt) and Sequence (one of its n choices): stored counters, derived state."""

from __future__ import annotations

import enum
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Callable

import numpy as np

from ..engine.types import FinishReason, TokenLogprobs
from ..errors import ContextOverflow
from .detokenize import Detokenizer
from .sampling import Sampler
from .stop import StopMatcher

if TYPE_CHECKING:
    from .grammar import Matcher


def completion_budget(max_tokens: int | None, prompt_tokens: int, context: int) -> int:
    """The tokens a request may generate: its max_tokens if it fits the context with the prompt,
    or, when the client set none (None), all the room the prompt leaves (OpenAI's chat default,
    as vLLM and llama-server do). Raises ContextOverflow, naming the numbers, when it cannot fit."""
    if max_tokens is None:
        if prompt_tokens >= context:
            raise ContextOverflow(
                f"this endpoint's context is {context} tokens per sequence, and the prompt has "
                f"{prompt_tokens} tokens, leaving no room to generate; shorten the prompt",
                param="messages")
        return context - prompt_tokens
    if prompt_tokens + max_tokens > context:
        raise ContextOverflow(
            f"this endpoint's context is {context} tokens per sequence, but the prompt has "
            f"{prompt_tokens} tokens and max_tokens is {max_tokens} ({prompt_tokens + max_tokens} in all); "
            "shorten the prompt or lower max_tokens", param="max_tokens")
    return max_tokens


class RequestStatus(enum.Enum):
    WAITING = "waiting"      # queued; holds no slot
    RUNNING = "running"      # holds n slots; prefilling, then decoding
    FINISHED = "finished"    # every choice has its finish reason
    ABORTED = "aborted"      # cancelled, failed or timed out; slots freed

    def can_become(self, other: "RequestStatus") -> bool:
        return other in _ALLOWED[self]


_ALLOWED = {
    RequestStatus.WAITING: {RequestStatus.RUNNING, RequestStatus.ABORTED},
    # RUNNING -> WAITING: a batch-priority request preempted for interactive work (Request.restart)
    RequestStatus.RUNNING: {RequestStatus.FINISHED, RequestStatus.ABORTED, RequestStatus.WAITING},
    RequestStatus.FINISHED: set(),
    RequestStatus.ABORTED: set(),
}


@dataclass(eq=False)
class Sequence:
    """One choice: its slot's KV holds prompt + output_ids[:-1]; the last output is fed next."""

    index: int
    sampler: Sampler
    stop: StopMatcher
    detok: Detokenizer = field(default_factory=Detokenizer)
    slot: int = -1
    matcher: "Matcher | None" = None          # structured output: this choice's grammar state
    output_ids: list[int] = field(default_factory=list)
    finish: FinishReason | None = None
    emitted: int = 0                         # characters of text sent so far
    # logprob entries (token text, start offset in the text, logprob, top) not yet sent
    pending: list[tuple[str, int, float | None, dict[str, float] | None]] = field(default_factory=list)

    @property
    def finished(self) -> bool:
        return self.finish is not None


@dataclass(eq=False)
class Request:
    id: str
    prompt_ids: list[int]
    max_tokens: int
    seqs: list[Sequence]
    sink: Callable[[object], None]           # receives lists of outputs, or an exception
    echo_text: str | None = None             # prompt text to prepend (echo)
    # echo + logprobs: tokens and offsets set on arrival, logprobs filled in during prefill
    prompt_logprobs: TokenLogprobs | None = None
    last_prompt_row: np.ndarray | None = None   # logits carried across prefill chunks for it
    deadline: float | None = None
    arrival: float = field(default_factory=time.monotonic)
    status: RequestStatus = RequestStatus.WAITING
    num_computed: int = 0                    # prompt tokens whose KV is in the first slot
    cached_tokens: int = 0                   # of those, taken from the prefix cache at admission
    # told what it computed when it retires (prompt tokens, generated): its ledger's settle
    on_end: Callable[[int, int], None] | None = None
    cache_partition: str = ""                # reuses cached prefixes of this partition only (slots)
    # "batch": admitted only into what interactive requests leave, preempted when they queue
    # (scheduler). Its outputs are held back until it finishes (EngineCore._flush), so that a
    # preempted one restarts from zero and its consumer never sees the discarded attempt.
    priority: str = "interactive"
    fresh_seqs: Callable[[], list[Sequence]] | None = None   # new choices, as prepare made them
    held: list = field(default_factory=list)                  # batch: outputs not yet delivered
    preemptions: int = 0

    def restart(self) -> None:
        """Back to how prepare built it (a preempted batch request): new choices (samplers,
        stop matchers, grammar states), nothing computed, nothing held. Its ledger reservation
        stays: on_end is called once, when it really ends."""
        assert self.fresh_seqs is not None, f"{self.id}: cannot restart"
        self.set_status(RequestStatus.WAITING)
        self.seqs = self.fresh_seqs()
        self.num_computed = self.cached_tokens = 0
        self.last_prompt_row = None
        if self.prompt_logprobs is not None:
            self.prompt_logprobs.token_logprobs.clear()
            self.prompt_logprobs.top_logprobs.clear()
        self.held = []
        self.preemptions += 1

    def set_status(self, new: RequestStatus) -> None:
        assert self.status.can_become(new), f"{self.id}: {self.status} -> {new}"
        self.status = new

    @property
    def batch(self) -> bool:
        return self.priority == "batch"

    @property
    def n(self) -> int:
        return len(self.seqs)

    @property
    def num_prompt(self) -> int:
        return len(self.prompt_ids)

    @property
    def prefilling(self) -> bool:
        return self.num_computed < self.num_prompt

    @property
    def done(self) -> bool:
        return all(s.finished for s in self.seqs)

    @property
    def num_output(self) -> int:
        return sum(len(s.output_ids) for s in self.seqs)

    @property
    def wants_prompt_logprobs(self) -> bool:
        return self.prompt_logprobs is not None
