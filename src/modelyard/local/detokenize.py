"""Turn a stream of token byte-pieces into UTF-8-safe text deltas.

Tokenizers (byte-level BPE in particular) may split one multi-byte UTF-8
character across several tokens.  ``Detokenizer`` holds such partial bytes back
until the character is whole, so every delta it returns is a valid ``str``.
Invalid bytes become U+FFFD (REPLACEMENT CHARACTER); it never raises.
"""

from __future__ import annotations

import codecs
from typing import Callable

__all__ = ["Detokenizer", "align_to_text"]


class Detokenizer:
    """Incremental UTF-8 decoder for a token stream (one per generation)."""

    def __init__(self) -> None:
        self._decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        self._parts: list[str] = []
        self.length = 0                      # characters emitted so far (hot path: no join)

    def push(self, piece: bytes) -> str:
        """Feed one token's bytes; return the text that is now complete."""
        return self._emit(self._decoder.decode(piece, final=False))

    def flush(self) -> str:
        """End of stream: return what is left (incomplete bytes -> U+FFFD)."""
        return self._emit(self._decoder.decode(b"", final=True))

    @property
    def text(self) -> str:
        """All text emitted so far (by ``push`` and ``flush``)."""
        if len(self._parts) > 1:
            self._parts = ["".join(self._parts)]
        return self._parts[0] if self._parts else ""

    def _emit(self, out: str) -> str:
        if out:
            self._parts.append(out)
            self.length += len(out)
        return out


def align_to_text(text: str, ids: list[int], piece: Callable[[int], bytes],
                  tokenize: Callable[[str], list[int]], longest_special: int = 64) -> tuple[list[bytes], list[int]]:
    """echo + logprobs: each prompt token's bytes and its offset (in characters) in `text`, the
    text it was tokenized from, so that text[offset[i]:offset[i+1]] is token i's text.

    Pieces alone do not add up to the text: a control token written in the prompt
    ("<start_of_turn>", "<|im_start|>") renders as an empty piece but takes its written text,
    while one the tokenizer added (gemma's BOS) takes none. An empty piece is given the shortest
    text at its position that tokenizes to exactly that token, or none. A token that ends inside
    a UTF-8 character is placed at the character's start, as a stream's offsets are."""
    raw = text.encode("utf-8")
    pos = 0
    pieces, offsets = [], []
    for t in ids:
        p = piece(t)
        if not p:
            for end in range(pos + 1, min(len(raw), pos + longest_special) + 1):
                try:
                    candidate = raw[pos:end].decode("utf-8")
                except UnicodeDecodeError:
                    continue
                if tokenize(candidate) == [t]:
                    p = raw[pos:end]
                    break
        offsets.append(len(raw[:pos].decode("utf-8", "ignore")))
        pieces.append(p)
        pos += len(p)
    return pieces, offsets
