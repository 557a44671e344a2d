"""VocabGuard: worker threads read a model's vocabulary (tokenizing, detokenizing) while the engine
thread may be freeing the model (an unload, a delete, a reload, a shutdown). Freeing it under a
reader is a use after free in llama.cpp: the process dies. Both embedded engines (LocalEngine,
EmbeddingEngine) hold their model through one of these, so the rule lives in one place.

The rule: `close()` refuses readers from then on and returns once every reader has left; only
then may the model be freed. A reader holds the guard for one bounded piece of work (a prompt, one
embeddings input), so a stop waits for at most that piece, never for a whole request.
"""

from __future__ import annotations

import contextlib
import threading
from typing import Callable, Generic, Iterator, TypeVar

from ..errors import ModelyardError

M = TypeVar("M")


class VocabGuard(Generic[M]):
    def __init__(self, refusal: Callable[[], ModelyardError]) -> None:
        self._refusal = refusal           # the error a reader gets once the model is closing
        self._cond = threading.Condition()
        self._readers = 0
        self._closed = False

    @contextlib.contextmanager
    def reading(self, model: M | None) -> Iterator[M]:
        """`model`, held open for the block (any thread); the refusal once it is closing."""
        with self._cond:
            if model is None or self._closed:
                raise self._refusal()
            self._readers += 1
        try:
            yield model
        finally:
            with self._cond:
                self._readers -= 1
                self._cond.notify_all()

    def close(self) -> None:
        """No reader starts after this; returns once the last one has left (engine thread)."""
        with self._cond:
            self._closed = True
            self._cond.wait_for(lambda: self._readers == 0)
