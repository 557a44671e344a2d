"""EngineRequest + vocabulary -> a validated `Request`, and the tokenizer's other uses.

Pure functions of a vocabulary (anything with `n_vocab`, `tokenize` and `piece`: ffi.LlamaModel,
or the tests' weightless FakeVocab), so that what the engine feeds llama.cpp and what the
/tokenize routes answer come from one place, and the scheduler's fake tests build their requests
with the production code instead of a copy of it.
"""

from __future__ import annotations

from typing import Callable, Protocol, Sequence as Seq

from ..engine.types import EngineRequest, TokenLogprobs, token_text
from ..errors import InvalidRequest
from .chat_template import ChatTemplate
from .detokenize import Detokenizer, align_to_text
from .grammar import Compiled
from .request import Request, Sequence, completion_budget
from .sampling import Sampler
from .stop import StopMatcher

PRIORITIES = ("interactive", "batch")     # engine.types.EngineRequest.priority


class Vocab(Protocol):
    n_vocab: int

    def tokenize(self, text: str, add_special: bool = True, parse_special: bool = True) -> list[int]: ...

    def piece(self, token: int) -> bytes: ...


def prompt_ids(r: EngineRequest, vocab: Vocab, chat: ChatTemplate | None, parse_special: bool) -> list[int]:
    """What llama.cpp is fed: the rendered chat, the prompt's tokens, or the ids as given."""
    if r.messages is not None:
        if chat is None:
            raise InvalidRequest("this endpoint has no chat template; use /completions", param="messages")
        return chat.tokens(r.messages, vocab.tokenize, parse_special, tools=r.tools)
    return list(r.prompt) if isinstance(r.prompt, tuple) else vocab.tokenize(r.prompt)


def check_ids(ids: Seq[int], vocab: Vocab, param: str) -> None:
    """Token ids a client sent must name tokens of this vocabulary."""
    bad = next((t for t in ids if not 0 <= t < vocab.n_vocab), None)
    if bad is not None:
        raise InvalidRequest(f"{param} holds token {bad}, which is outside the vocabulary (0..{vocab.n_vocab - 1})",
                             param=param)


def detokenize(vocab: Vocab, ids: Seq[int]) -> str:
    """The text of a token sequence, as a stream of them would show it (UTF-8 safe)."""
    d = Detokenizer()
    return "".join(d.push(vocab.piece(t)) for t in ids) + d.flush()


def echo_tokens(vocab: Vocab, ids: list[int], echo: str) -> TokenLogprobs:
    """The echoed prompt's tokens and offsets, aligned to the echoed text (control tokens
    written in the prompt keep their text; see align_to_text)."""
    pieces, offsets = align_to_text(echo, ids, vocab.piece, lambda s: vocab.tokenize(s, add_special=False))
    return TokenLogprobs(tokens=[token_text(p) for p in pieces], text_offset=offsets)


def prepare(r: EngineRequest, vocab: Vocab, chat: ChatTemplate | None, *, context: int, parallel: int,
            parse_special: bool, sink: Callable[[object], None], grammar: Compiled | None = None) -> Request:
    """Tokenize and validate before the engine sees the request, so a bad one costs no step.
    `grammar`: a constrained request's constraint, compiled beforehand (Grammars.compile)."""
    if r.tools and r.tool_choice == "auto":
        raise InvalidRequest("tool_choice 'auto' (the default with tools) is not supported by embedded "
                             "endpoints: set tool_choice to 'required' or name a function (the answer is then "
                             "a call, constrained to its parameters), or 'none' for a text answer",
                             param="tool_choice")
    ids = prompt_ids(r, vocab, chat, parse_special)
    if not ids:
        raise InvalidRequest("prompt is empty: it must contain at least one token", param="prompt")
    check_ids(ids, vocab, "prompt")
    out_of_vocab = [t for t in r.sampling.logit_bias if not 0 <= t < vocab.n_vocab]
    if out_of_vocab:
        raise InvalidRequest(f"logit_bias names token {out_of_vocab[0]}, outside the vocabulary "
                             f"(0..{vocab.n_vocab - 1})", param="logit_bias")
    max_tokens = completion_budget(r.max_tokens, len(ids), context)
    if r.n > parallel:
        raise InvalidRequest(f"n is {r.n}, but this endpoint runs at most {parallel} sequences at once",
                             param="n")
    if r.constraint is not None and grammar is None:
        raise InvalidRequest(f"{r.constraint.field}: this endpoint has no structured output",
                             param=r.constraint.field)
    if r.priority not in PRIORITIES:
        raise InvalidRequest(f"priority is {r.priority!r}; it must be one of {', '.join(PRIORITIES)}",
                             param="priority")

    def fresh_seqs() -> list[Sequence]:
        seqs = [Sequence(i, Sampler(r.sampling.for_choice(i)), StopMatcher(r.stop)) for i in range(r.n)]
        if r.constraint is not None:
            for seq, matcher in zip(seqs, grammar.matchers(r.n)):
                seq.matcher = matcher
        return seqs

    seqs = fresh_seqs()
    echo = prompt_lp = None
    if r.echo and r.messages is None:
        echo = r.prompt if isinstance(r.prompt, str) else detokenize(vocab, ids)
        if r.sampling.logprobs is not None:
            prompt_lp = echo_tokens(vocab, ids, echo)
    return Request(r.request_id, ids, max_tokens, seqs, sink, echo, prompt_lp, deadline=r.deadline,
                   cache_partition=r.cache_partition, priority=r.priority,
                   fresh_seqs=fresh_seqs if r.priority == "batch" else None)
