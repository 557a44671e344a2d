"""What kind of model a GGUF file holds, read from its header in pure Python (no llama.cpp load).

The registry must pick the engine (generation or embeddings) before loading the model, and
loading it is what the engine does on its own thread; so the two metadata keys that decide are
read here: `general.architecture` and `<arch>.pooling_type`. Only the key/value section is
read (values of other keys are skipped, arrays without materialising them); tensors never.
"""

from __future__ import annotations

import struct
from pathlib import Path
from typing import BinaryIO

from ..engine.types import ModelType
from ..errors import StoreError

# Encoder-only architectures of llama.cpp: they have no LM head, so they can only embed.
ENCODERS = frozenset({"bert", "nomic-bert", "nomic-bert-moe", "jina-bert-v2", "jina-bert-v3", "neo-bert",
                      "modern-bert", "t5encoder"})
POOLED = (1, 2, 3)          # llama_pooling_type MEAN, CLS, LAST (0 NONE, 4 RANK: not an embedding)

# GGUF value types -> struct format of a scalar (8: string, 9: array are read by hand).
_SCALARS = {0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<?", 10: "<Q", 11: "<q", 12: "<d"}
_STRING, _ARRAY = 8, 9
MAX_KEYS = 1 << 20          # sanity bounds: a corrupt header must not make us loop or allocate forever
MAX_STRING = 1 << 28
MAX_DIMS = 4                # GGML_MAX_DIMS


def model_type(path: Path) -> ModelType:
    """EMBEDDINGS for an encoder-only architecture or a GGUF that declares a pooling; else COMPLETIONS."""
    meta = read_keys(path, lambda key: key == "general.architecture" or key.endswith(".pooling_type"))
    arch = meta.get("general.architecture")
    if arch in ENCODERS or meta.get(f"{arch}.pooling_type") in POOLED:
        return ModelType.EMBEDDINGS
    return ModelType.COMPLETIONS


def read_keys(path: Path, wanted) -> dict[str, object]:
    """The scalar and string metadata values whose key `wanted(key)` accepts (an array's: its
    length)."""
    return read_header(path, wanted, tensors=False)[0]


def read_header(path: Path, wanted, tensors: bool = True, on_tensor=None) -> tuple[dict[str, object], int]:
    """`read_keys`' values and the bytes of tensor data the file holds (from the end of the
    header, aligned, to the end of the file): what local/footprint needs, without the tensors.
    (gguf's GGUFReader parses every array too: 30 s for gemma3's 262,144-token vocabulary on a
    loaded machine, where this takes a fraction of one.) `tensors=False`: the keys only (0 bytes).
    `on_tensor(name, dims, ggml_type)` is called for each tensor's entry, if given."""
    try:
        with open(path, "rb") as f:
            magic, version = f.read(4), _read(f, "<I")
            if magic != b"GGUF" or version not in (2, 3):
                raise StoreError(f"{path} is not a GGUF file of version 2 or 3 (magic {magic!r}, version {version})")
            n_tensors = _read(f, "<Q")
            n_keys = _read(f, "<Q")
            if n_keys > MAX_KEYS or n_tensors > MAX_KEYS:
                raise StoreError(f"{path}: GGUF header claims {n_keys} metadata keys and {n_tensors} tensors")
            found: dict[str, object] = {}
            for _ in range(n_keys):
                key = _string(f)
                value = _value(f, _read(f, "<I"), keep=wanted(key))
                if value is not None:
                    found[key] = value
            if not tensors:
                return found, 0
            for _ in range(n_tensors):          # name, dims, type, offset
                if on_tensor is None:
                    _string(f, keep=False)
                    f.seek(8 * _read(f, "<I") + 4 + 8, 1)
                    continue
                name, n_dims = _string(f), _read(f, "<I")
                if n_dims > MAX_DIMS:
                    raise struct.error(f"tensor {name!r} has {n_dims} dimensions")
                dims = struct.unpack(f"<{n_dims}Q", f.read(8 * n_dims))
                ggml_type = _read(f, "<I")
                f.seek(8, 1)
                on_tensor(name, dims, ggml_type)
            align = int(found.get("general.alignment", 32))     # type: ignore[arg-type]
            start = -(-f.tell() // align) * align
            size = f.seek(0, 2)
            if start > size:
                raise struct.error("the tensor data starts past the end of the file")
            return found, size - start
    except (OSError, struct.error, UnicodeDecodeError) as exc:
        raise StoreError(f"cannot read the GGUF header of {path}: {exc}") from None


def _read(f: BinaryIO, fmt: str):
    size = struct.calcsize(fmt)
    return struct.unpack(fmt, f.read(size))[0]


def _string(f: BinaryIO, keep: bool = True) -> str | None:
    n = _read(f, "<Q")
    if n > MAX_STRING:
        raise struct.error(f"string of {n} bytes")
    if not keep:
        f.seek(n, 1)
        return None
    return f.read(n).decode("utf-8")


def _value(f: BinaryIO, kind: int, keep: bool):
    if kind in _SCALARS:
        value = _read(f, _SCALARS[kind])
        return value if keep else None
    if kind == _STRING:
        return _string(f, keep)
    if kind == _ARRAY:
        item, n = _read(f, "<I"), _read(f, "<Q")
        if item in _SCALARS:
            f.seek(n * struct.calcsize(_SCALARS[item]), 1)
        elif item == _STRING:
            for _ in range(n):
                _string(f, keep=False)
        else:
            raise struct.error(f"array of GGUF type {item}")
        return n if keep else None
    raise struct.error(f"unknown GGUF value type {kind}")
