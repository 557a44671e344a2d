"""An endpoint's kind (COMPLETIONS or EMBEDDINGS): configured, from the store's known model, or
read from a GGUF's header before the engine is chosen; the factory gets the resolved kind."""

from __future__ import annotations

import asyncio
import struct
from pathlib import Path

import pytest

from modelyard.engine.types import ModelType
from modelyard.errors import ConfigError, InvalidRequest, StoreError
from modelyard.local.gguf_header import model_type, read_keys
from modelyard.registry.endpoint import Endpoint, EndpointState
from modelyard.registry.registry import Registry, declared_type
from modelyard.registry.render import status
from modelyard.settings import EndpointSpec, Settings, load


def _s(text: str) -> bytes:
    raw = text.encode()
    return struct.pack("<Q", len(raw)) + raw


def write_gguf(path: Path, arch: str, pooling: int | None = None) -> Path:
    """A GGUF v3 header as llama.cpp's converter writes one (no tensors): the architecture, a
    token array to skip over, a u32 and, if given, the pooling type."""
    kvs = [_s("general.architecture") + struct.pack("<I", 8) + _s(arch),
           _s("tokenizer.ggml.tokens") + struct.pack("<IIQ", 9, 8, 3) + _s("[CLS]") + _s("hello") + _s("[SEP]"),
           _s("tokenizer.ggml.scores") + struct.pack("<IIQ", 9, 6, 3) + struct.pack("<3f", 0, 0, 0),
           _s(f"{arch}.context_length") + struct.pack("<II", 4, 512)]
    if pooling is not None:
        kvs.append(_s(f"{arch}.pooling_type") + struct.pack("<II", 4, pooling))
    path.write_bytes(b"GGUF" + struct.pack("<IQQ", 3, 0, len(kvs)) + b"".join(kvs))
    return path


@pytest.mark.parametrize("arch, pooling, kind", [
    ("bert", 1, ModelType.EMBEDDINGS), ("bert", None, ModelType.EMBEDDINGS),      # encoder-only
    ("qwen3", 3, ModelType.EMBEDDINGS),                                          # a decoder that pools (last)
    ("llama", None, ModelType.COMPLETIONS), ("llama", 0, ModelType.COMPLETIONS),  # pooling NONE
])
def test_gguf_header_says_the_kind(tmp_path, arch, pooling, kind):
    path = write_gguf(tmp_path / "m.gguf", arch, pooling)
    assert model_type(path) is kind
    assert read_keys(path, lambda k: k.endswith("context_length")) == {f"{arch}.context_length": 512}


def test_a_corrupt_header_is_a_store_error(tmp_path):
    good = write_gguf(tmp_path / "m.gguf", "bert", 1).read_bytes()
    for name, data in [("cut.gguf", good[:40]), ("ggml.gguf", b"GGML" + good[4:]),
                       ("huge.gguf", good[:16] + struct.pack("<Q", 1 << 40) + good[24:])]:
        (tmp_path / name).write_bytes(data)
        with pytest.raises(StoreError, match=name):
            model_type(tmp_path / name)


def test_declared_kind_before_loading():
    assert declared_type(EndpointSpec(name="a")) is ModelType.COMPLETIONS                  # smollm2: known
    assert declared_type(EndpointSpec(name="a", model="minilm-l6-v2")) is ModelType.EMBEDDINGS
    assert declared_type(EndpointSpec(name="a", kind="embeddings")) is ModelType.EMBEDDINGS
    assert declared_type(EndpointSpec(name="a", engine="openai", urls=("http://h/v1",))) is ModelType.COMPLETIONS
    assert declared_type(EndpointSpec(name="a", model="/some/file.gguf")) is None         # read at load


def test_kind_is_validated_and_read_from_toml(tmp_path):
    with pytest.raises(ConfigError, match="kind must be one of .*'embedding'"):
        EndpointSpec(name="a", kind="embedding")
    cfg = tmp_path / "c.toml"
    cfg.write_text('[[endpoints]]\nname = "e"\nengine = "openai"\nurls = ["http://h/v1"]\nkind = "embeddings"\n'
                   '[limits]\nmax_embedding_inputs = 8\n')
    settings = load(cfg, env={})
    assert settings.endpoints[0].kind == "embeddings" and settings.limits.max_embedding_inputs == 8


class Started:
    def __init__(self, spec):
        self.spec = spec
        self.model_type = ModelType(spec.kind.upper())

    async def start(self):
        pass

    async def stop(self):
        pass

    def ready_reason(self):
        return None

    def status(self):
        return {"in_flight": 0}


def test_the_factory_gets_the_kind_read_from_the_file(tmp_path):
    bert, llama = write_gguf(tmp_path / "bert.gguf", "bert", 1), write_gguf(tmp_path / "llama.gguf", "llama")
    settings = Settings(store_dir=tmp_path, endpoints=(EndpointSpec(name="e", model=str(bert)),
                                                       EndpointSpec(name="c", model=str(llama))))
    seen = {}

    def factory(spec, path):
        seen[spec.name] = (spec.kind, path)
        return Started(spec)

    async def scenario():
        reg = Registry(settings, engine_factory=factory)
        assert reg.get("e").model_type is None            # unknown until the header is read
        reg.start()
        await reg.wait_loaded()
        await reg.stop()
        return reg

    reg = asyncio.run(scenario())
    assert seen == {"e": ("embeddings", bert), "c": ("completions", llama)}
    assert reg.get("e").model_type is ModelType.EMBEDDINGS and reg.get("c").model_type is ModelType.COMPLETIONS


def test_a_kind_the_model_contradicts_fails_the_endpoint_saying_so(tmp_path):
    bert = write_gguf(tmp_path / "bert.gguf", "bert", 1)
    settings = Settings(store_dir=tmp_path, endpoints=(
        EndpointSpec(name="generate-from-bert", model=str(bert), kind="completions"),
        EndpointSpec(name="embed-with-bert", model=str(bert), kind="embeddings"),
        EndpointSpec(name="embed-with-smollm", model="smollm2-135m", kind="embeddings")))
    built = []

    async def scenario():
        reg = Registry(settings, engine_factory=lambda spec, path: built.append(spec.name) or Started(spec))
        reg.start()
        await reg.wait_loaded()
        reasons = {name: ep.reason for name, ep in reg.endpoints.items()}
        await reg.stop()
        return reasons

    reasons = asyncio.run(scenario())
    assert built == ["embed-with-bert"] and reasons["embed-with-bert"] is None           # the others never got an engine (nor a download)
    assert "has kind = 'completions', but its model" in reasons["generate-from-bert"]
    assert "is an embedding model" in reasons["generate-from-bert"]
    assert "kind = 'embeddings', but its model 'smollm2-135m' is a completions model" in reasons["embed-with-smollm"]
    assert not (tmp_path / "models").exists()     # smollm2 was not fetched to find that out


def test_wrong_kind_is_a_400_whatever_the_state():
    ep = Endpoint(EndpointSpec(name="e", engine="openai", urls=("http://h/v1",), kind="embeddings"),
                  model_type=ModelType.EMBEDDINGS)
    assert ep.state is EndpointState.LOADING
    with pytest.raises(InvalidRequest) as info:
        ep.require_type(ModelType.COMPLETIONS, "/completions")
    assert info.value.status == 400 and info.value.param == "model" and info.value.code == "wrong_model_type"
    ep.require_type(ModelType.EMBEDDINGS, "/embeddings")
    assert status(ep)["model_type"] == "EMBEDDINGS" and status(ep)["model_engine"] == "OPENAI_PROXY"
    unknown = Endpoint(EndpointSpec(name="f", model="/x.gguf"))
    unknown.require_type(ModelType.EMBEDDINGS, "/embeddings")     # not known yet: readiness answers
    assert status(unknown)["model_type"] is None and status(unknown)["model_engine"] == "LLAMA_CPP"
