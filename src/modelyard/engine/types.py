"""The request types that cross the engine boundary, and what engines give back.

The API layer builds an EngineRequest (completions, chat) or an EmbeddingRequest from a validated
HTTP body; generating engines yield ChoiceDelta events and, last, one Usage; embedding engines
return one EmbeddingResult. Engines never see HTTP; the API never sees which engine runs.
"""

from __future__ import annotations

import dataclasses
import enum
from dataclasses import dataclass, field
from typing import Mapping, Protocol, Union

from ..errors import EngineError


class LedgerEntry(Protocol):
    """What an engine does with the request's accounting (quota/ledger.Entry), and nothing else."""

    async def reserve(self, tokens: int) -> None:
        """Before any work: the most the request may use (RateLimited if the key cannot hold it)."""

    def settle(self, prompt_tokens: int, completion_tokens: int) -> None:
        """Once, on the event loop, however it ended: what was computed (prompt tokens
        prefilled, tokens generated); for a finished request, its `usage`."""

# Steps of one request's output that may wait for its reader (a streaming client that reads
# slowly). An engine never waits for a client, so past this the request is ended with an error
# rather than buffered without bound (README, Guarantees). A step gives at most one event per
# choice, so a prompt's stream holds at most MAX_PENDING * n events; a request of several
# prompts is held to that same amount in all (api/openai/streaming.merge).
MAX_PENDING = 1024


def reads_too_slowly(waiting: str) -> EngineError:
    """The error a request gets when `waiting` (its output, described) waits for a slow reader."""
    return EngineError(f"the client reads too slowly: {waiting} were waiting for it; the request was aborted")


class FinishReason(str, enum.Enum):
    STOP = "stop"        # end-of-generation token or a stop string
    LENGTH = "length"    # max_tokens reached
    # Only an upstream (proxy engine) reports these; they pass through as OpenAI defines them.
    CONTENT_FILTER = "content_filter"
    TOOL_CALLS = "tool_calls"
    FUNCTION_CALL = "function_call"


@dataclass(frozen=True)
class SamplingParams:
    temperature: float = 0.0          # 0: greedy
    top_p: float = 1.0
    seed: int | None = None           # choice i of n samples with seed + i
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    logit_bias: Mapping[int, float] = field(default_factory=dict)
    logprobs: int | None = None       # None: off; k: the sampled token plus k alternatives
    top_k: int = 0                    # draw among the k most likely only (0: all); vLLM's and Anthropic's

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0

    def for_choice(self, index: int) -> "SamplingParams":
        """Params of choice `index`: its own seed, so each choice is reproducible alone."""
        if self.seed is None:
            return self
        return dataclasses.replace(self, seed=self.seed + index)


@dataclass(frozen=True)
class Constraint:
    """Structured output: what every choice's text must match, whatever the request field that
    asked for it (response_format, vLLM's structured_outputs/guided_*, llama-server's
    json_schema/grammar, a chat tool call). `source` is canonical, so equal constraints compile once."""
    kind: str            # one of KINDS
    source: str          # JSON schema (compact JSON, key order kept), regex, JSON list of choices, or grammar
    field: str           # the request field, for errors ("response_format", "structured_outputs.regex")
    strict: bool = True  # False: unsupported schema keywords are ignored (logged), not refused


CONSTRAINT_KINDS = ("json_schema", "regex", "choice", "lark", "gbnf")


@dataclass(frozen=True)
class EngineRequest:
    request_id: str
    prompt: str | tuple[int, ...]     # text, or token ids
    sampling: SamplingParams = SamplingParams()
    n: int = 1
    # None: the client set no limit, so the engine gives what is left of the context after the
    # prompt (chat's default, as OpenAI's); only the engine knows the prompt's length after
    # templating. /completions resolves OpenAI's 16 itself.
    max_tokens: int | None = None
    stop: tuple[str, ...] = ()
    echo: bool = False
    deadline: float | None = None     # time.monotonic() by which generation must end
    # chat: the engine renders these with the model's template (embedded) or passes them on
    # to the upstream's /chat/completions (proxy); `prompt` is then unused.
    messages: tuple[dict, ...] | None = None
    constraint: Constraint | None = None      # structured output for every choice
    tools: tuple[dict, ...] | None = None     # chat: OpenAI tool definitions, for the chat template
    tool_choice: str | dict | None = None     # with tools: "auto" | "required" | "none" | a named function
    # Prefix caching: a prompt reuses computed KV (a slot's cache, a host copy) only of requests
    # with the same partition, so that one tenant cannot time another's prompt out of the cache
    # (api/openai/cache_scope makes it from the key and vLLM's cache_salt). An opaque id, never a secret.
    cache_partition: str = ""
    # Its place in the request's ledger (quota/ledger): the engine reserves the most it may use
    # before any work and settles what it computed once, however it ended. None: not accounted.
    ledger: "LedgerEntry | None" = field(default=None, compare=False, repr=False)
    # "interactive" | "batch": the scheduler gives batch work only the room interactive work leaves
    # (local/scheduler), a remote endpoint only its batch_share (proxy/batch_share); the batch
    # runner (batch/runner) sets it.
    priority: str = "interactive"
    # A remote endpoint's replica affinity (proxy/routing): the client's `user`, or the endpoint's
    # session header. Routing only; never sent upstream, never logged.
    session: str | None = field(default=None, repr=False)


_BYTES = "bytes:"


def token_text(piece: bytes) -> str:
    """A token's text for logprobs; a piece that is not whole UTF-8 is shown as its bytes
    ("bytes:\\xe2\\x80", as OpenAI writes them). `token_bytes` is its inverse."""
    try:
        return piece.decode("utf-8")
    except UnicodeDecodeError:
        return _BYTES + "".join(f"\\x{b:02x}" for b in piece)


def token_bytes(text: str) -> bytes:
    """A logprobs token's raw bytes: the piece itself, also for a partial UTF-8 byte token."""
    if text.startswith(_BYTES):
        hexes = text[len(_BYTES):].split("\\x")[1:]
        try:
            raw = bytes(int(h, 16) for h in hexes)
        except ValueError:
            raw = None
        if raw is not None and token_text(raw) == text:
            return raw
    return text.encode("utf-8")


@dataclass
class TokenLogprobs:
    """OpenAI's legacy completions logprobs, for the tokens of one delta."""

    tokens: list[str] = field(default_factory=list)
    token_logprobs: list[float | None] = field(default_factory=list)
    top_logprobs: list[dict[str, float] | None] = field(default_factory=list)
    text_offset: list[int] = field(default_factory=list)

    def extend(self, other: "TokenLogprobs") -> None:
        self.tokens += other.tokens
        self.token_logprobs += other.token_logprobs
        self.top_logprobs += other.top_logprobs
        self.text_offset += other.text_offset

    def as_dict(self) -> dict:
        return {"tokens": self.tokens, "token_logprobs": self.token_logprobs,
                "top_logprobs": self.top_logprobs, "text_offset": self.text_offset}


@dataclass
class ChoiceDelta:
    index: int
    text: str = ""
    logprobs: TokenLogprobs | None = None
    finish_reason: FinishReason | None = None
    # an upstream's tool-call deltas, as OpenAI streams them ([{"index", "id", "function": {...}}])
    tool_calls: tuple[dict, ...] | None = None
    stop_sequence: str | None = None      # with finish_reason "stop": the stop string that matched, if one did


@dataclass(frozen=True)
class Usage:
    prompt_tokens: int
    completion_tokens: int
    cached_tokens: int = 0        # of the prompt's, computed before (a prefix cache): OpenAI's cached_tokens

    @property
    def total_tokens(self) -> int:
        return self.prompt_tokens + self.completion_tokens

    def as_dict(self) -> dict:
        return {"prompt_tokens": self.prompt_tokens, "completion_tokens": self.completion_tokens,
                "total_tokens": self.total_tokens}


EngineOutput = Union[ChoiceDelta, Usage]


class ModelType(str, enum.Enum):
    """What an endpoint serves (the platform's `model_type`): one kind per endpoint."""
    COMPLETIONS = "COMPLETIONS"     # /completions and /chat/completions
    EMBEDDINGS = "EMBEDDINGS"       # /embeddings


@dataclass
class EmbeddingRequest:
    request_id: str
    # Normalised by the API: a string input becomes [string], a list of ids becomes [[ids]].
    inputs: tuple[str, ...] | tuple[tuple[int, ...], ...]
    dimensions: int | None = None     # None: the model's own; engines that cannot reduce raise
    truncate: bool = False            # True: inputs past the context are cut (documented), else 400
    deadline: float | None = None
    ledger: "LedgerEntry | None" = field(default=None, compare=False, repr=False)
    # as EngineRequest's: a batch's inputs are packed only into room interactive inputs leave
    # (local/embeddings_batch.Packer), a remote endpoint's within its batch_share
    priority: str = "interactive"


@dataclass(frozen=True)
class EmbeddingResult:
    vectors: tuple[tuple[float, ...], ...]   # one per input, in input order, as the model's library gives them
    prompt_tokens: int
