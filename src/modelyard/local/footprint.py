"""How much memory an embedded endpoint needs, from its GGUF's header, before anything loads.

The memory budget (registry/lifecycle) must decide whether a model fits, and what to evict for it,
before paying for the load; so the figure comes from the file and the endpoint's shape:

    weights  = the tensors' data (mapped from the file, resident once touched), plus, for a
               generation endpoint, the copies llama.cpp makes of the matrices its CPU repacks
               (CPU_REPACK, anonymous memory beside the mapped pages: `repacked_bytes`)
    kv       = n_layer x context x parallel x (n_embd_k_gqa + n_embd_v_gqa) x 2 bytes (f16 K and V)
    compute  = n_batch x (n_vocab + 4 x n_embd) x 4 bytes (llama.cpp's CPU graph is dominated
               by the logits of one batch) + the output buffer (parallel x n_vocab x 4 bytes)
    host     = the endpoint's host prefix cache bound (prefix_cache_mib), which it may fill
    vocab    = (tokens + BPE merges) x VOCAB_ENTRY_BYTES: llama.cpp's vocabulary on the heap (a
               std::string, score and attribute per token, the token-to-id map, the merge ranks
               as pairs of strings), which no buffer line reports

An upper bound by construction: sliding-window layers (gemma3) are counted as full ones. After
the load the engine reports what llama.cpp allocated (`Footprint` from the context's buffer
lines, local/ffi, plus the vocabulary's term), and that figure replaces the estimate in the
budget. Checked against llama.cpp's own figures for smollm2-135m and gemma3-270m at two shapes
each (within 3 %, above), and against the process's RSS (below).

The vocabulary's term was missing until bench/lifecycle.py's RSS passed the budget: loading a
model raised RSS by its weights plus 18.3 MiB (smollm2-135m: 49,152 tokens and 48,900 merges)
and 49.5 MiB (gemma3-270m: 262,144 tokens, no merges), measured on 2026-12-07 (AMD EPYC,
AVX-512) with LlamaModel alone; 200 bytes an entry covers both. Without it, smollm2 loaded and
answering held 137 MiB of RSS against a 127.5 MiB estimate.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass
from pathlib import Path

from gguf import GGML_QUANT_SIZES, GGMLQuantizationType

from ..errors import StoreError
from ..settings import EndpointSpec
from .gguf_header import read_header, read_keys

MIB = 1 << 20
F16 = 2
F32 = 4
VOCAB_ENTRY_BYTES = 200     # heap bytes per vocabulary token or BPE merge (see the module)
VOCAB_KEYS = ("tokenizer.ggml.tokens", "tokenizer.ggml.merges")     # arrays: read_header gives their lengths


@dataclass(frozen=True)
class Footprint:
    weights: int
    kv: int
    compute: int
    host: int = 0
    vocab: int = 0

    @property
    def total(self) -> int:
        return self.weights + self.kv + self.compute + self.host + self.vocab

    @property
    def mib(self) -> float:
        return round(self.total / MIB, 1)


# What llama.cpp copies into its CPU_REPACK buffer when a generation engine loads a file repacked
# (local/repacking: always for deterministic = false, where the load-time probe passes otherwise):
# on x86, ggml-cpu/repack.cpp's ggml_repack_get_optimal_repack_type, by ggml type and the CPU
# feature (ggml's system info) its kernels need, for matrices of a multiple of 8 rows; token_embd is
# read by GET_ROWS, which the repacked buffer does not take. Counted whether or not the probe will
# pass, so the estimate stays an upper bound. Checked against llama.cpp's CPU_REPACK buffer
# (tests/local/test_repacking.py): 56.95 MiB for smollm2's Q4_0 conversion, 12.66 MiB for gemma3's
# Q4_K_M. Other architectures (ARM, RISC-V) repack other types: not counted there.
_Q = GGMLQuantizationType
REPACKED_ON_X86 = {_Q.Q4_0: "AVX2", _Q.Q4_K: "AVX2", _Q.IQ4_NL: "AVX2", _Q.MXFP4: "AVX2", _Q.Q2_K: "AVX512"}
REPACK_ROWS = 8


def repacked_bytes(tensors: list[tuple[str, tuple[int, ...], int]], system_info: str) -> int:
    """Bytes of `tensors` (name, dims, ggml type) llama.cpp copies into CPU_REPACK on a CPU whose
    ggml reports `system_info` (local/ffi.system_info)."""
    if "REPACK = 1" not in system_info:
        return 0
    total = 0
    for name, dims, ggml_type in tensors:
        feature = REPACKED_ON_X86.get(ggml_type)
        if (feature is None or f" {feature} = 1" not in system_info or len(dims) < 2
                or dims[1] % REPACK_ROWS or name.startswith("token_embd")):
            continue
        block, size = GGML_QUANT_SIZES[GGMLQuantizationType(ggml_type)]
        total += math.prod(dims) // block * size
    return total


def n_batch(spec: EndpointSpec) -> int:
    """The tokens per llama_decode the generation engine asks for (local/engine)."""
    return max(spec.batch, spec.parallel + 2)


def estimate(path: Path, spec: EndpointSpec, embeddings: bool) -> Footprint:
    """The memory endpoint `spec` will need to serve the GGUF at `path` (see the module)."""
    tensors: list[tuple[str, tuple[int, ...], int]] = []
    meta, weights = read_header(path, lambda key: key.startswith(("general.", *VOCAB_KEYS))
                                or key.count(".") >= 1 and not key.startswith("tokenizer."),
                                on_tensor=lambda *t: tensors.append(t))
    arch = meta.get("general.architecture")

    def num(key: str, default: int | None = None) -> int:
        value = meta.get(f"{arch}.{key}", default)
        if not isinstance(value, (int, float)) or isinstance(value, bool):
            # absent, or a per-layer array (only its length is read): say so rather than guess
            raise StoreError(f"{path}: GGUF header has no usable {arch}.{key} to size the model's memory")
        return int(value)
    n_embd, n_head = num("embedding_length"), num("attention.head_count")
    n_vocab = num("vocab_size", 0) or int(meta.get("tokenizer.ggml.tokens", 0))     # an array: its length
    vocab = _vocab({"tokenizer.ggml.tokens": n_vocab, **meta})
    host = spec.prefix_cache_mib * MIB if spec.prefix_cache and not embeddings else 0
    if embeddings:          # an encoder: no KV cache; a batch of hidden states and its attention
        # scores as plain attention holds them (batch x batch a head): an upper bound since the
        # engine runs flash attention (minilm, 512 tokens: llama.cpp allocates 14.2 MB of 18.9).
        batch = max(spec.batch, spec.context)       # the engine's batch holds its longest input
        return Footprint(weights, 0, batch * (8 * n_embd + batch * n_head) * F32, vocab=vocab)
    head_dim = n_embd // n_head
    n_head_kv = num("attention.head_count_kv", n_head)
    k = n_head_kv * num("attention.key_length", head_dim)
    v = n_head_kv * num("attention.value_length", head_dim)
    kv = num("block_count") * spec.context * spec.parallel * (k + v) * F16
    compute = n_batch(spec) * (n_vocab + 4 * n_embd) * F32 + spec.parallel * n_vocab * F32
    # ggml's CPU features as the load will see them; imported here, so that what imports this
    # module (the registry, in a gateway with remote endpoints only) does not load llama.cpp
    from .ffi import system_info
    return Footprint(weights + repacked_bytes(tensors, system_info()), kv, compute, host, vocab)


def _vocab(meta: dict) -> int:
    """The vocabulary's heap from a header's token and merge lists' lengths (see the module)."""
    return sum(int(meta.get(key, 0)) for key in VOCAB_KEYS) * VOCAB_ENTRY_BYTES


def vocab_of(path: Path) -> int:
    """`_vocab` of the GGUF at `path`; 0 when this reader cannot parse the header (a loaded
    model's figure is then llama.cpp's alone: under a budget, `estimate` already refused such a
    file before the load)."""
    try:
        return _vocab(read_keys(path, lambda key: key in VOCAB_KEYS))
    except StoreError:
        return 0


def reported(model_bytes: int, buffers_mib: dict[str, float], host: int = 0, vocab: int = 0,
             weight_buffers_mib: dict[str, float] | None = None) -> Footprint:
    """What llama.cpp allocated for a loaded endpoint: its weights (llama_model_size), plus the
    copies it made of them in the CPU_REPACK buffer (`weight_buffers_mib`, the model's buffer
    lines: repacked tensors live there in anonymous memory while the file's pages they were read
    from stay mapped, +57 MiB of RSS for smollm2's Q4_0 conversion, measured), and its context's
    buffers as it logged them (local/ffi), plus the host prefix cache's bound and the
    vocabulary's heap (`vocab_of`, which no buffer line reports). `estimate`, before the load,
    counts the repacked copies whether or not a deterministic endpoint's probe will keep them
    (local/repacking): after the load the registry accounts this figure instead."""
    repacked = int((weight_buffers_mib or {}).get("CPU_REPACK", 0.0) * MIB)
    return Footprint(model_bytes + repacked, int(buffers_mib.get("KV", 0.0) * MIB),
                     int((buffers_mib.get("compute", 0.0) + buffers_mib.get("output", 0.0)) * MIB), host, vocab)


def give_back() -> None:
    """Return the heap's free pages to the system after a model is unloaded. glibc keeps what an
    engine's threads freed in their malloc arenas (about 50 MiB per gemma3-270m load with its
    vocabulary's strings), so without this a process's RSS crept up by that much per reload
    and passed the budget after twenty evictions (bench/lifecycle.py); malloc_trim(0) trims
    every arena. Not glibc (musl, macOS): nothing to do."""
    trim = _malloc_trim()
    if trim is not None:
        trim(0)


@functools.cache
def _malloc_trim():
    import ctypes
    import ctypes.util
    name = ctypes.util.find_library("c")        # runs ldconfig: once
    try:
        return ctypes.CDLL(name).malloc_trim if name else None
    except (OSError, AttributeError):
        return None
