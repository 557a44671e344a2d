"""Turn a stream of token byte-pieces into UTF-8-safe text deltas.

Tokenizers (byte-level BPE in particular) may split one multi-byte UTF-8
character across several tokens.  ``Detokenizer`` holds such partial bytes back
until the character is whole, so every delta it returns is a valid ``str``.
Invalid bytes become U+FFFD (REPLACEMENT CHARACTER); it never raises.
"""

from __future__ import annotations

import codecs

__all__ = ["Detokenizer"]


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
