"""Fixtures for the structured-output tests: smollm2's vocabulary as llguidance sees it (no
server), and the corpus (tests/structured/corpus.py) with its instances."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Iterator

import pytest

sys.path.insert(0, str(Path(__file__).parent))      # corpus, instances, walk

from modelyard.local.ffi import LlamaModel          # noqa: E402
from modelyard.local.grammar import Grammars        # noqa: E402
from modelyard.settings import Settings             # noqa: E402
from modelyard.store import ModelStore              # noqa: E402


@pytest.fixture(scope="session")
def smollm2() -> Iterator[LlamaModel]:
    model = LlamaModel(ModelStore(Settings().store_dir, progress=False).resolve("smollm2-135m"))
    yield model
    model.close()


@pytest.fixture(scope="session")
def grammars(smollm2: LlamaModel) -> Iterator[Grammars]:
    g = Grammars(smollm2.ll_tokenizer)
    yield g
    g.close()
