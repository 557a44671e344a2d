"""A sentence-transformers BERT model (safetensors + tokenizer.json + pooling config) -> one GGUF
that llama.cpp's BERT architecture loads.

Written from what llama.cpp reads (src/models/bert.cpp, src/llama-vocab.cpp), not from its
converter: the keys and tensor names below are the ones the loader asks for, the weights keep the
model's own float32 (a 22M-parameter model: 87 MiB, and no rounding to explain away in the
reference test), and the output is byte-for-byte the same for the same input, so the store can
pin its sha256.

The vocabulary: llama.cpp's WordPiece ("bert", WPM) writes a word-initial piece with a leading
U+2581 and a continuation without one, where HF writes the word-initial piece bare and the
continuation with "##"; control tokens ([CLS], [SEP], ...) keep their text. The normalizer flags
are written explicitly because llama.cpp's default for a GGUF without them is "do not lowercase".
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from .errors import StoreError

ARCH = "bert"
PHANTOM_SPACE = "\u2581"
_POOLING = {"pooling_mode_mean_tokens": "MEAN", "pooling_mode_cls_token": "CLS"}
# HF tensor name (after "encoder.layer.N.") -> llama.cpp's (after "blk.N.")
_LAYER = {
    "attention.self.query": "attn_q",
    "attention.self.key": "attn_k",
    "attention.self.value": "attn_v",
    "attention.output.dense": "attn_output",
    "attention.output.LayerNorm": "attn_output_norm",
    "intermediate.dense": "ffn_up",
    "output.dense": "ffn_down",
    "output.LayerNorm": "layer_output_norm",
}
_EMBEDDINGS = {
    "embeddings.word_embeddings": "token_embd",
    "embeddings.position_embeddings": "position_embd",
    "embeddings.token_type_embeddings": "token_types",
    "embeddings.LayerNorm": "token_embd_norm",
}
# Not used for sentence embeddings (the pooler is BERT's NSP head; position_ids is a buffer).
_SKIPPED = ("pooler.", "embeddings.position_ids")


def convert(model_dir: Path, out: Path, name: str) -> None:
    """Write the GGUF for the sentence-transformers model in `model_dir` to `out`."""
    import gguf  # only the store's conversion step needs these two
    from safetensors.numpy import load_file

    config = _json(model_dir / "config.json")
    if config.get("model_type") != "bert":
        raise StoreError(f"{name}: {model_dir / 'config.json'} is not a BERT model "
                         f"(model_type {config.get('model_type')!r})")
    tokenizer = _json(model_dir / "tokenizer.json")
    pooling = _pooling(model_dir / "1_Pooling" / "config.json", name)
    tokens, types = _vocab(tokenizer, config["vocab_size"], name)
    tensors = _tensors(load_file(str(model_dir / "model.safetensors")), config["num_hidden_layers"], name)

    w = gguf.GGUFWriter(str(out), ARCH)
    w.add_name(name)
    w.add_context_length(config["max_position_embeddings"])
    w.add_embedding_length(config["hidden_size"])
    w.add_feed_forward_length(config["intermediate_size"])
    w.add_block_count(config["num_hidden_layers"])
    w.add_head_count(config["num_attention_heads"])
    w.add_layer_norm_eps(float(config["layer_norm_eps"]))
    w.add_causal_attention(False)
    w.add_pooling_type(gguf.PoolingType[pooling])
    w.add_file_type(gguf.LlamaFileType.ALL_F32)

    w.add_tokenizer_model("bert")
    w.add_tokenizer_pre("default")
    w.add_token_list(tokens)
    w.add_token_types(types)
    w.add_token_type_count(config.get("type_vocab_size", 2))
    normalizer = tokenizer.get("normalizer") or {}
    lowercase = bool(normalizer.get("lowercase", False))
    strip = normalizer.get("strip_accents")
    w.add_bool("tokenizer.ggml.normalizer.lowercase", lowercase)
    w.add_bool("tokenizer.ggml.normalizer.strip_accents", lowercase if strip is None else bool(strip))
    ids = {t: i for i, t in enumerate(_hf_tokens(tokenizer, config["vocab_size"]))}
    w.add_bos_token_id(ids["[CLS]"])            # llama.cpp's WPM prepends the BOS: BERT's [CLS]
    w.add_sep_token_id(ids["[SEP]"])
    w.add_unk_token_id(ids["[UNK]"])
    w.add_pad_token_id(ids["[PAD]"])
    w.add_mask_token_id(ids["[MASK]"])
    w.add_add_bos_token(True)
    w.add_add_sep_token(True)
    w.add_add_eos_token(False)

    for tname, data in tensors:
        w.add_tensor(tname, data)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def _json(path: Path) -> dict:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise StoreError(f"cannot read {path}: {e}") from e


def _pooling(path: Path, name: str) -> str:
    """The pooling the model's library applies: the one mode its 1_Pooling/config.json turns on."""
    cfg = _json(path)
    on = [mode for key, mode in _POOLING.items() if cfg.get(key)]
    others = [k for k, v in cfg.items() if k.startswith("pooling_mode_") and v and k not in _POOLING]
    if len(on) != 1 or others:
        raise StoreError(f"{name}: unsupported pooling in {path}: {cfg} (llama.cpp pools by mean or CLS)")
    return on[0]


def _hf_tokens(tokenizer: dict, n_vocab: int) -> list[str]:
    vocab: dict[str, int] = tokenizer["model"]["vocab"]
    tokens = [""] * n_vocab
    for tok, i in vocab.items():
        tokens[i] = tok
    return tokens


def _vocab(tokenizer: dict, n_vocab: int, name: str) -> tuple[list[str], list[int]]:
    """HF WordPiece tokens -> llama.cpp's phantom-space form, and each token's type."""
    import gguf

    model = tokenizer.get("model") or {}
    if model.get("type") != "WordPiece" or model.get("continuing_subword_prefix") != "##":
        raise StoreError(f"{name}: tokenizer.json is not a '##' WordPiece tokenizer")
    hf = _hf_tokens(tokenizer, n_vocab)
    if "" in hf:
        raise StoreError(f"{name}: tokenizer.json lacks ids {hf.index('')}.. of {n_vocab}")
    special = {t["content"] for t in tokenizer.get("added_tokens", []) if t.get("special")}
    tokens, types = [], []
    for tok in hf:
        if tok in special:
            tokens.append(tok)
            types.append(gguf.TokenType.CONTROL)
        else:
            tokens.append(tok[2:] if tok.startswith("##") else PHANTOM_SPACE + tok)
            types.append(gguf.TokenType.NORMAL)
    return tokens, types


def _tensors(weights: dict[str, np.ndarray], n_layer: int, name: str) -> list[tuple[str, np.ndarray]]:
    """(llama.cpp name, float32 array) for every weight, in a fixed order (a stable file)."""
    out = []
    for hf_name in sorted(weights):
        if hf_name.startswith(_SKIPPED):
            continue
        out.append((_tensor_name(hf_name, n_layer, name), np.ascontiguousarray(weights[hf_name], np.float32)))
    return out


def _tensor_name(hf_name: str, n_layer: int, name: str) -> str:
    stem, _, kind = hf_name.rpartition(".")      # kind: weight | bias
    if stem in _EMBEDDINGS:
        return f"{_EMBEDDINGS[stem]}.{kind}"
    prefix = "encoder.layer."
    if stem.startswith(prefix):
        index, _, rest = stem[len(prefix):].partition(".")
        if index.isdigit() and int(index) < n_layer and rest in _LAYER:
            return f"blk.{index}.{_LAYER[rest]}.{kind}"
    raise StoreError(f"{name}: unexpected tensor {hf_name!r} in model.safetensors")
