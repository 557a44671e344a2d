"""Fixtures for the structured-output tests: smollm2's vocabulary as llguidance sees it (no
server), and the server the end-to-end tests use. The corpus, its instances and the walked sample
are testkit.structured's (bench/structured.py measures on them too)."""

from __future__ import annotations

import warnings
from typing import Iterator

import pytest

from modelyard.local.ffi import LlamaModel
from modelyard.local.grammar import Grammars
from modelyard.settings import Settings
from modelyard.store import ModelStore


@pytest.fixture(scope="session")
def smollm2() -> Iterator[LlamaModel]:
    model = LlamaModel(ModelStore(Settings().store_dir, progress=False).resolve("smollm2-135m"))
    yield model
    model.close()


def quiet_tokenizer(model: LlamaModel):
    """llguidance's llama.cpp adapter calls llama_token_get_attr, which llama-cpp-python marks
    deprecated: one DeprecationWarning per token (49,152) without this."""
    def make():
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)
            return model.ll_tokenizer()
    return make


@pytest.fixture(scope="session")
def grammars(smollm2: LlamaModel) -> Iterator[Grammars]:
    g = Grammars(quiet_tokenizer(smollm2))
    yield g
    g.close()


KEY = "structured-key"
# One thread (the machine is shared); four slots so that requests batch; a body limit above
# 1 MB so that the adversarial tests' large schemas reach the compiler (test_adversarial).
SERVER_CONFIG = f"""\
[server]
api_keys = ["{KEY}"]
log_level = "info"

[limits]
max_body_bytes = 2500000

[[endpoints]]
name = "smollm2-135m"
model = "smollm2-135m"
context = 1024
parallel = 4
threads = 1
"""


@pytest.fixture(scope="session")
def structured_server(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory):
    from testkit.servers import served
    with served(tmp_path_factory.mktemp("structured"), SERVER_CONFIG, key=KEY,
                show_log=lambda: bool(request.session.testsfailed)) as srv:
        yield srv


@pytest.fixture(scope="session")
def openai_client(structured_server):
    import openai
    with openai.OpenAI(base_url=structured_server.api, api_key=KEY, max_retries=0, timeout=120) as c:
        yield c
