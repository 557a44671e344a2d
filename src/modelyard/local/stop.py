"""Incremental stop-string matching with hold-back.

Semantics (the reference implementation in ``tests/local/test_stop.py`` is the
executable spec):

* Generation stops at the first position where any stop string *completes*
  (the earliest end position).  The text returned is everything before the
  earliest-*starting* stop string that ends there, i.e. the longest one.
  Consequences:
    - Two stops starting at the same position (``"ab"`` and ``"abc"``): the
      shorter completes first and we stop right then.  The emitted text is the
      same either way (text before that position), so nothing is lost by not
      waiting for the longer one.
    - Stops ending at the same position (``"ab"`` and ``"b"`` on ``"xab"``):
      we cut before the earlier start, giving ``"x"``.
    - A stop that contains another stop strictly inside it (``"abcd"`` and
      ``"bc"``) can never win: ``"bc"`` completes first.  The alternative,
      "earliest start over the whole text", would have to keep generating
      after a stop string has already appeared (to see whether ``"abcd"``
      follows) and would make the decision depend on text produced after the
      stop; we deliberately do not do that.  For stop sets where no stop is an
      interior substring of another, both rules give identical results.
* Emitted text never contains a stop string, not even its beginning: the
  longest suffix of the text so far that is a proper prefix of some stop is
  held back until disambiguated (``flush`` releases it at EOS/length).
* Empty stop strings are ignored (they would match before any output).
"""

from __future__ import annotations

from collections.abc import Sequence

__all__ = ["StopMatcher"]


class StopMatcher:
    # Invariant between calls (while not stopped):
    #   all_text == emitted + held, and ``held`` is the LONGEST suffix of
    #   all_text that is a proper prefix of some stop string (maybe "").
    # Hence no stop occurrence can start inside ``emitted``: one that were
    # still incomplete would make a longer such suffix, and a complete one
    # would already have stopped us.  So each push only scans held + new text,
    # whose size is bounded by max_stop_len - 1 + len(new text).

    def __init__(self, stops: Sequence[str]) -> None:
        self._stops = tuple(dict.fromkeys(s for s in stops if s))
        self._max_hold = max((len(s) for s in self._stops), default=1) - 1
        self._held = ""
        self._stopped = False
        self.matched: str | None = None     # the stop string that ended the text (Anthropic's stop_sequence)

    @property
    def held(self) -> str:
        """Text currently held back because it may start a stop string."""
        return self._held

    @property
    def stopped(self) -> bool:
        return self._stopped

    def push(self, text: str) -> tuple[str, bool]:
        """Feed new text; return (text safe to emit now, stopped)."""
        assert not self._stopped, "StopMatcher.push() after a stop string matched"
        if not self._stops:
            return text, False
        buf = self._held + text
        # Earliest-ending match; ties broken by earliest start.  For one stop
        # string, its first occurrence (str.find) is also its earliest end.
        best: tuple[int, int] | None = None  # (end, start)
        for stop in self._stops:
            start = buf.find(stop)
            if start >= 0 and (best is None or (start + len(stop), start) < best):
                best, self.matched = (start + len(stop), start), stop
        if best is not None:
            self._stopped, self._held = True, ""
            return buf[: best[1]], True
        # No match: hold back the longest suffix that is a proper prefix of a
        # stop (no complete stop is in buf, so any stop-prefix is proper).
        keep = 0
        for k in range(min(len(buf), self._max_hold), 0, -1):
            tail = buf[-k:]
            if any(stop.startswith(tail) for stop in self._stops):
                keep = k
                break
        self._held = buf[len(buf) - keep :]
        return buf[: len(buf) - keep], False

    def flush(self) -> str:
        """End of generation (EOS/length): release the held-back text."""
        out, self._held = self._held, ""
        return out
