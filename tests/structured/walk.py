"""Walking a Matcher token by token, as the engine does: each token must be in the mask the
matcher computes (Matcher.masked on a zero row), and at the end the grammar must let generation
stop (it is done, or the end-of-sequence token is allowed)."""

from __future__ import annotations

import numpy as np

from modelyard.local.grammar import Matcher

MAX_TOKENS = 4000        # longer instances are cut (and not counted as accepted or rejected)


def allowed_mask(matcher: Matcher, n_vocab: int) -> np.ndarray:
    return np.isfinite(matcher.masked(np.zeros(n_vocab, np.float32)))


def walk(matcher: Matcher, tokens: list[int], n_vocab: int, eos: int) -> bool:
    """True when the grammar takes every token of `tokens` through its mask and may end after them."""
    for t in tokens:
        if not allowed_mask(matcher, n_vocab)[t]:
            return False
        if not matcher.consume(t):
            raise AssertionError(f"token {t} was in the mask but consume refused it: {matcher.error}")
    return matcher.done or bool(allowed_mask(matcher, n_vocab)[eos])


def random_text(matcher: Matcher, tokenizer, n_vocab: int, eos: int, rng: np.random.Generator,
                structural: np.ndarray, max_tokens: int = 300) -> str | None:
    """A string the grammar allows, drawn token by token from its mask (tokens that hold JSON
    punctuation favoured so that strings and arrays end); None if it did not end in max_tokens."""
    out: list[int] = []
    for _ in range(max_tokens):
        allowed = allowed_mask(matcher, n_vocab)
        if matcher.done:
            return tokenizer.decode_str(out)
        if allowed[eos] and rng.random() < 0.5:
            return tokenizer.decode_str(out)
        allowed[eos] = False
        choices = np.flatnonzero(allowed & structural) if rng.random() < 0.7 else np.empty(0, int)
        if len(choices) == 0:
            choices = np.flatnonzero(allowed)
        if len(choices) == 0:
            return tokenizer.decode_str(out) if matcher.done else None
        t = int(rng.choice(choices))
        assert matcher.consume(t), matcher.error
        out.append(t)
    return None
