"""The ONLY importer of llama_cpp: thin owners of llama.cpp's C handles.

Every C return code becomes an EngineError here, so nothing above this module sees ctypes.
All calls on a LlamaContext must come from the engine's one scheduler thread (see loop.py).
"""

from __future__ import annotations

import ctypes
import functools
import os
import re
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import llama_cpp as C
import numpy as np

from ..errors import EngineError

_GGML_LOG_LEVEL_ERROR = 4
_BUFFER_LINE = re.compile(r"(\S+) (?:model|KV|compute) buffer size = +([0-9.]+) MiB")
# a context's allocations as llama.cpp logs them: "CPU  output buffer size = 0.38 MiB", "CPU KV
# buffer size = 11.25 MiB" (one line per KV cache: gemma3 has two), "CPU compute buffer size = ..."
_CONTEXT_LINE = re.compile(r"\S+ +(output|KV|compute) buffer size = +([0-9.]+) MiB")

# llama.cpp logs through one process-wide C callback, from the thread that makes the call;
# a model loads on its endpoint's engine thread, so a thread-local list collects that load's
# buffer lines without mixing endpoints that load at the same time.
_capture = threading.local()


@C.llama_log_callback
def _log_errors_only(level, text, _user_data):  # pragma: no cover - called from C
    # llama.cpp is chatty (hundreds of lines per load); keep its errors, and the lines that
    # say which buffer types hold the weights (CPU_REPACK or CPU: which kernels run).
    line = text.decode("utf-8", "replace")
    if level == _GGML_LOG_LEVEL_ERROR:
        print(line, end="", flush=True)
    elif "buffer size" in line and getattr(_capture, "lines", None) is not None:
        _capture.lines.append(line)


@functools.cache
def _init_backend() -> None:
    C.llama_log_set(_log_errors_only, ctypes.c_void_p())
    C.llama_backend_init()


def choose_kernels(deterministic: bool) -> None:
    """Process-wide kernel switches; call before the first context exists (ggml reads them
    once, when it plans its first graph).

    ggml's tiled K-quant matmul (Q2_K..Q6_K, IQ*) takes over from the per-row dot products
    for batches of >= 8 rows, and computes a row differently from them: gemma3-270m's
    Q4_K_M logits changed by up to 1.3 with how a prompt was chunked (0.0 with it off). It
    can only be switched off for the whole process, so one deterministic endpoint turns it
    off for all; prefill speed was the same without it (docs/performance.md).
    """
    if deterministic:
        os.environ["GGML_CPU_TILED_MM"] = "0"


@functools.cache
def _thread_switch(symbol: str):
    """A per-thread kernel switch that scripts/install patches into the llama.cpp it builds
    (scripts/patches: ggml_backend_cpu_set_thread_use_ref, ..._set_thread_fa_tile_invariant),
    as a ctypes function of one bool, or None in a build without it."""
    # The copy of ggml-cpu that libllama runs, found by name among the libraries already
    # loaded (RTLD_NOLOAD). A wheel holds its libraries as copies, not links (libggml-cpu.so,
    # .so.0, .so.0.25.3), and opening another copy by path gives a second ggml-cpu whose
    # thread-local switch libllama never reads.
    for lib in sorted((Path(C.__file__).parent / "lib").glob("*ggml-cpu*")):
        try:
            fn = getattr(ctypes.CDLL(lib.name, mode=os.RTLD_NOLOAD), symbol)
        except (OSError, AttributeError):
            continue
        fn.argtypes, fn.restype = [ctypes.c_bool], None
        return fn
    return None


def _set_thread_switch(symbol: str, on: bool) -> bool:
    """Sets the calling thread's switch `symbol` (see _thread_switch); False in a build without it."""
    fn = _thread_switch(symbol)
    if fn is None:
        return False
    fn(on)
    return True


def fixed_order_kernels() -> bool:
    """Whether this llama.cpp build can pin its reference kernels to one thread (see
    use_fixed_order_kernels)."""
    return _thread_switch("ggml_backend_cpu_set_thread_use_ref") is not None


def use_fixed_order_kernels(on: bool = True) -> bool:
    """From now on (`on`; until a call with False), every graph the CALLING thread computes runs
    ggml's reference kernels: flash attention one key at a time, in cell order, for any number of
    queries and keys (no tiled path at >= 64 queries, no split of the keys across threads for a
    lone query), no tiled matmul. So a row's attention depends on its own keys alone and a
    deterministic endpoint can run flash attention: ggml's tiled and split-KV paths sum in orders
    that depend on the batch's shape (a prompt chunked otherwise gave other logits, max |diff|
    0.49), which is why deterministic contexts ran plain attention before (docs/performance.md).
    Op fusions stay (scripts/patches/ggml-cpu-use-ref-keeps-fusion.patch): the fused RMS_NORM+MUL
    computes each row as the two ops do, bit for bit, one graph node and barrier fewer a norm
    (about 3 % of a decode). Per thread, not per process, so the other endpoints of the process
    keep their own kernels. False (and nothing changes) in a llama.cpp build without the patch."""
    return _set_thread_switch("ggml_backend_cpu_set_thread_use_ref", on)


def tile_invariant_attention(on: bool = True) -> bool:
    """From now on (`on`; until a call with False), ggml's tiled flash attention computes each
    row in one order, wherever its keys fall in the KV tiles and SIMD lanes, and runs at any
    number of queries (stock: from FLASH_ATTN_TILE up), on every graph the CALLING thread computes
    (scripts/patches/ggml-cpu-tiled-fa-tile-invariant.patch): the row's max over all its keys
    first (exact in any order), then one pass against it with no rescaling between tiles, the
    exponentials summed key by key in double, V accumulated key by key as before. A masked key
    adds exact zeros, so a row depends on its own sequence's keys alone and an encoder's inputs
    pack tight, at any offset (local/embeddings). It costs a second pass over the scores of the
    tiles that hold a key of the row (kept from the first, in a buffer of each compute thread's).
    Per thread; False (and nothing changes) in a build without the patch."""
    return _set_thread_switch("ggml_backend_cpu_set_thread_fa_tile_invariant", on)


def generation_kernels(deterministic: bool, fixed_order: bool = True) -> tuple[bool, bool]:
    """The kernels of a generation context the CALLING thread will decode on, as (fixed_order,
    flash_attn): deterministic pins ggml's fixed-order kernels to the thread where this build has
    them (`fixed_order` False: as on a build without them) and runs flash attention only with
    them, else plain attention; deterministic = false runs llama.cpp's own flash attention."""
    want = deterministic and fixed_order
    pinned = use_fixed_order_kernels(want) and want
    return pinned, pinned or not deterministic


def tiled_kquant_matmul() -> bool:
    """Whether ggml's tiled K-quant matmul is on in this process (see choose_kernels)."""
    return os.environ.get("GGML_CPU_TILED_MM", "1").strip() not in ("0", "")


_SYSTEM_INFO_LOCK = threading.Lock()
_SYSTEM_INFO: list[str] = []


def system_info() -> str:
    """ggml's CPU features and build switches ("AVX2 = 1 | ..."), read once per process. llama.cpp
    rebuilds one static std::string on every llama_print_system_info call, so two threads calling
    it at once (the registry's memory estimate beside an engine logging its load) read a torn
    string, and the process crashed (SIGSEGV, in CI). It never changes once the backends load."""
    with _SYSTEM_INFO_LOCK:
        if not _SYSTEM_INFO:
            _SYSTEM_INFO.append(C.llama_print_system_info().decode())
        return _SYSTEM_INFO[0]


def _context_buffers(make):
    """`make()` (a llama_init_from_model call) and the MiB llama.cpp says it allocated, by kind
    ({"output", "KV", "compute"}): what local/footprint's estimate is checked against."""
    _init_backend()
    _capture.lines = []
    try:
        ctx = make()
        out: dict[str, float] = {}
        for line in _capture.lines:
            m = _CONTEXT_LINE.search(line)
            if m:
                out[m.group(1)] = out.get(m.group(1), 0.0) + float(m.group(2))
        return ctx, out
    finally:
        _capture.lines = None


def _buffers(lines: list[str]) -> dict[str, float]:
    """llama.cpp's "<type> model buffer size = N MiB" lines -> {type: MiB} (weights only)."""
    out: dict[str, float] = {}
    for line in lines:
        m = _BUFFER_LINE.search(line)
        if m and " model buffer" in line:
            out[m.group(1)] = out.get(m.group(1), 0.0) + float(m.group(2))
    return out


# llama_vocab_type's values (llama.h): the tokenizer family of a GGUF
_VOCAB_TYPES = {0: "none", 1: "spm", 2: "bpe", 3: "wpm", 4: "ugm", 5: "rwkv", 6: "plamo2"}


class LlamaModel:
    """Weights and vocabulary of one GGUF file (read-only, shareable across contexts).

    repack=False keeps every weight in ggml's plain CPU layout. With it on, llama.cpp moves
    Q4_0, Q4_K, IQ4_NL and MXFP4 matrices (and Q2_K with AVX-512) into the CPU_REPACK buffer on
    x86 CPUs with AVX2 (local/footprint.REPACKED_ON_X86; not Q8_0, which it repacks on ARM), whose
    kernels compute rows in groups (a 4-row GEMM, a GEMV for the rest), so a row's logits
    can depend on how many rows its batch has where the two kernels round differently
    (stock Q4_K did: gemma3-270m's greedy text changed under load on an AVX2-only EPYC;
    scripts/patches fixes it). The plain layout computes each row alone. Which layout a
    generation engine gets: local/repacking.
    """

    def __init__(self, path: Path, repack: bool = True) -> None:
        _init_backend()
        params = C.llama_model_default_params()
        params.use_extra_bufts = repack
        _capture.lines = []
        try:
            self._model = C.llama_model_load_from_file(str(path).encode(), params)
            self.buffers = _buffers(_capture.lines)
        finally:
            _capture.lines = None
        if not self._model:
            raise EngineError(f"llama.cpp could not load {path} (not a valid GGUF model?)")
        self._vocab = C.llama_model_get_vocab(self._model)
        self.n_vocab: int = C.llama_vocab_n_tokens(self._vocab)
        self.n_ctx_train: int = C.llama_model_n_ctx_train(self._model)
        self.n_embd: int = C.llama_model_n_embd(self._model)
        self.size_bytes: int = C.llama_model_size(self._model)     # the tensors' bytes, as loaded
        # Its memory is a KV cache of cells alone (nothing recurrent): LlamaContext fills each
        # sequence's cells in position order, which the runner's filler rows rely on.
        self.kv_only: bool = not C.llama_model_is_recurrent(self._model) and not C.llama_model_is_hybrid(self._model)
        # Its sliding-window layers' window, in tokens (0: none, as smollm2; gemma3-270m: 512).
        self.n_swa: int = C.llama_model_n_swa(self._model)
        self._pieces: dict[int, bytes] = {}

    def tokenize(self, text: str, add_special: bool = True, parse_special: bool = True) -> list[int]:
        """`parse_special`: text such as "<|im_end|>" becomes that special token (else plain text)."""
        data = text.encode("utf-8")
        cap = len(data) + 8
        buf = (C.llama_token * cap)()
        n = C.llama_tokenize(self._vocab, data, len(data), buf, cap, add_special, parse_special)
        if n < 0:  # buffer too small: -n is the size needed
            cap = -n
            buf = (C.llama_token * cap)()
            n = C.llama_tokenize(self._vocab, data, len(data), buf, cap, add_special, parse_special)
        if n < 0:
            raise EngineError(f"tokenization failed ({n})")
        return list(buf[:n])

    def piece(self, token: int) -> bytes:
        """The bytes of one token as generated text (special tokens render empty)."""
        cached = self._pieces.get(token)
        if cached is None:
            buf = ctypes.create_string_buffer(64)
            n = C.llama_token_to_piece(self._vocab, token, buf, 64, 0, False)
            if n < 0:
                buf = ctypes.create_string_buffer(-n)
                n = C.llama_token_to_piece(self._vocab, token, buf, -n, 0, False)
            cached = self._pieces[token] = buf.raw[:n]
        return cached

    def is_eog(self, token: int) -> bool:
        return bool(C.llama_vocab_is_eog(self._vocab, token))

    @property
    def bos(self) -> int | None:
        bos = C.llama_vocab_bos(self._vocab)
        return bos if bos >= 0 else None

    @property
    def eos_text(self) -> str:
        eos = C.llama_vocab_eos(self._vocab)
        return C.llama_vocab_get_text(self._vocab, eos).decode("utf-8", "replace") if eos >= 0 else ""

    @property
    def bos_text(self) -> str:
        bos = self.bos
        return C.llama_vocab_get_text(self._vocab, bos).decode("utf-8", "replace") if bos is not None else ""

    def ll_tokenizer(self):
        """llguidance's view of this vocabulary, for structured output (about 1 s for 50k tokens).
        It keeps a pointer to the vocabulary: use it only while this model is open."""
        import llguidance.llamacpp
        return llguidance.llamacpp.lltokenizer_from_vocab(self._vocab)

    def vocab_text(self, token: int) -> str:
        """The token as the vocabulary writes it ("Ġhello", "<|im_end|>"): HF's convert_ids_to_tokens."""
        return C.llama_vocab_get_text(self._vocab, token).decode("utf-8", "replace")

    @property
    def add_bos(self) -> bool:
        """Whether tokenizing with add_special puts the BOS first (the GGUF says)."""
        return bool(C.llama_vocab_get_add_bos(self._vocab))

    @property
    def vocab_type(self) -> str:
        return _VOCAB_TYPES.get(C.llama_vocab_type(self._vocab), "unknown")

    def chat_template(self) -> str | None:
        tpl = C.llama_model_chat_template(self._model, None)
        return tpl.decode("utf-8") if tpl else None

    def meta(self, key: str) -> str | None:
        buf = ctypes.create_string_buffer(256)
        n = C.llama_model_meta_val_str(self._model, key.encode(), buf, 256)
        return buf.value.decode("utf-8", "replace") if n >= 0 else None

    @property
    def pooling(self) -> str | None:
        """The pooling the GGUF declares ("mean", "cls", "last"), None for a model without one
        (a completions model)."""
        arch = self.meta("general.architecture")
        value = self.meta(f"{arch}.pooling_type") if arch else None
        return _POOLING.get(value) if value is not None else None

    @property
    def causal(self) -> bool:
        """Whether attention is causal (a decoder: the default); encoders (BERT) say false."""
        arch = self.meta("general.architecture")
        return (self.meta(f"{arch}.attention.causal") if arch else None) != "false"

    def apply_builtin_template(self, name: str, messages: list[tuple[str, str]]) -> str:
        """llama.cpp's own C++ rendering of a named chat format (for GGUFs without a template)."""
        chat = (C.llama_chat_message * len(messages))(
            *[C.llama_chat_message(role.encode(), content.encode()) for role, content in messages])
        size = 256 + sum(len(c.encode()) + 32 for _, c in messages)
        for _ in range(2):
            buf = ctypes.create_string_buffer(size)
            n = C.llama_chat_apply_template(name.encode(), chat, len(messages), True, buf, size)
            if n < 0:
                raise EngineError(f"llama.cpp does not know the chat format {name!r}")
            if n <= size:
                return buf.raw[:n].decode("utf-8", "replace")
            size = n
        raise EngineError("chat template rendering did not converge")

    def close(self) -> None:
        if self._model:
            C.llama_model_free(self._model)
            self._model = None


_POOLING = {"1": "mean", "2": "cls", "3": "last"}


# ggml's CPU flash attention: its tiled kernel's tile of queries and of keys (GGML_FA_TILE_Q and
# GGML_FA_TILE_KV in ggml-cpu/common.h of the llama.cpp that llama-cpp-python 0.3.36 vendors). If a
# new llama.cpp changes them, the embeddings engine's load-time probe refuses flash attention
# (local/embeddings) and the invariance tests say so.
FLASH_ATTN_TILE = 64


def simd_lanes() -> int:
    """float32 lanes of the vector width ggml's CPU kernels run with here (AVX-512: 16, else 8;
    8 also covers NEON's 4). EmbeddingContext's callers align sequences to it (see there)."""
    return 16 if "AVX512 = 1" in system_info() else 8


QUANTS = {"q8_0": C.LLAMA_FTYPE_MOSTLY_Q8_0, "q4_0": C.LLAMA_FTYPE_MOSTLY_Q4_0}


def quantize(src: Path, dst: Path, kind: str, threads: int) -> None:
    """llama.cpp's own quantizer (requantizing from the published file)."""
    _init_backend()
    params = C.llama_model_quantize_default_params()
    params.nthread = threads
    params.ftype = QUANTS[kind]
    params.allow_requantize = True
    rc = C.llama_model_quantize(str(src).encode(), str(dst).encode(), ctypes.byref(params))
    if rc != 0:
        raise EngineError(f"llama.cpp could not convert {src} to {kind} (code {rc})")


@dataclass(frozen=True)
class ContextShape:
    n_seq: int          # parallel sequences, each in its own KV stream
    n_ctx_seq: int      # tokens each sequence may hold
    n_batch: int        # tokens per llama_decode
    n_threads: int
    kv_unified: bool = False
    flash_attn: bool = False


def _run_batch(ctx, batch, tok, pos, tokens: Sequence[int], positions: Sequence[int], seqs: Sequence[int],
               what: str) -> None:
    """Fill a llama_batch (one sequence id per row; its token and position arrays are `tok`
    and `pos`) and run llama_decode on it."""
    n = len(tokens)
    tok[:n] = tokens
    pos[:n] = positions
    seq_id = batch.seq_id
    for i, s in enumerate(seqs):
        seq_id[i][0] = s
    batch.n_tokens = n
    rc = C.llama_decode(ctx, batch)
    if rc != 0:
        # 1: no KV slot for the batch; 2: aborted; <0: fatal. Admission should make 1 impossible.
        raise EngineError(f"llama_decode failed with code {rc} on {what} of {n} tokens")


class LlamaContext:
    """One llama_context: the KV cache of all sequences and the decode call."""

    def __init__(self, model: LlamaModel, shape: ContextShape) -> None:
        p = C.llama_context_default_params()
        p.n_ctx = shape.n_ctx_seq * shape.n_seq
        p.n_batch = p.n_ubatch = shape.n_batch
        p.n_seq_max = shape.n_seq
        p.n_threads = p.n_threads_batch = shape.n_threads
        p.kv_unified = shape.kv_unified
        # Sliding-window layers (gemma3) keep a full-size cache too (llama.cpp's default, made sure
        # of): a cell is never reused for a new position while it holds one out of the window, so
        # a sequence's cells below its end are full and above it empty, as in any other layer (a
        # shorter reused prefix finds its window, and the runner's filler rows rely on it).
        p.swa_full = True
        p.no_perf = True
        # Batch invariance: ggml's CPU flash attention sums in an order that depends on how
        # many query rows a sequence has in the ubatch, so the same prompt chunked differently
        # (as load decides) gave other logits (max |diff| 0.49 on a 240-token prompt), unless
        # the thread that decodes runs the reference kernels (use_fixed_order_kernels). Without
        # them, plain attention gives bit-identical logits for any chunking of >= 2 tokens.
        p.flash_attn_type = (C.LLAMA_FLASH_ATTN_TYPE_AUTO if shape.flash_attn
                             else C.LLAMA_FLASH_ATTN_TYPE_DISABLED)
        self._ctx, self.buffers = _context_buffers(lambda: C.llama_init_from_model(model._model, p))
        if not self._ctx:
            raise EngineError(f"llama.cpp could not create a context of {p.n_ctx} tokens")
        self._mem = C.llama_get_memory(self._ctx)
        self.n_vocab = model.n_vocab
        self.shape = shape
        self._batch = C.llama_batch_init(shape.n_batch, 0, 1)
        self._tok = np.ctypeslib.as_array(self._batch.token, shape=(shape.n_batch,))
        self._pos = np.ctypeslib.as_array(self._batch.pos, shape=(shape.n_batch,))
        self._nseq = np.ctypeslib.as_array(self._batch.n_seq_id, shape=(shape.n_batch,))
        self._want = np.ctypeslib.as_array(self._batch.logits, shape=(shape.n_batch,))
        self._nseq[:] = 1

    def decode(self, tokens: Sequence[int], positions: Sequence[int], seqs: Sequence[int],
               logits: Sequence[bool]) -> None:
        """One llama_decode over a batch; row i's logits are then at logits_row(i)."""
        n = len(tokens)
        assert 0 < n <= self.shape.n_batch
        self._want[:n] = logits
        _run_batch(self._ctx, self._batch, self._tok, self._pos, tokens, positions, seqs, "a batch")

    def logits_row(self, i: int) -> np.ndarray:
        """A zero-copy view of batch row i's logits, valid until the next decode."""
        ptr = C.llama_get_logits_ith(self._ctx, i)
        if not ptr:
            raise EngineError(f"no logits for batch row {i}")
        return np.ctypeslib.as_array(ptr, shape=(self.n_vocab,))

    def seq_rm(self, seq: int, p0: int = 0, p1: int = -1) -> None:
        if not C.llama_memory_seq_rm(self._mem, seq, p0, p1):
            raise EngineError(f"could not drop positions {p0}..{p1} of sequence {seq}")

    @property
    def n_ctx_seq(self) -> int:
        return self.shape.n_ctx_seq

    def seq_pos_max(self, seq: int) -> int:
        """The last position `seq` holds in the KV (-1: none)."""
        return C.llama_memory_seq_pos_max(self._mem, seq)

    def seq_cp(self, src: int, dst: int) -> None:
        """Copy src's whole KV to dst (with separate streams: a full buffer copy, applied
        at the next decode)."""
        self.seq_rm(dst)
        C.llama_memory_seq_cp(self._mem, src, dst, -1, -1)

    def seq_state(self, seq: int) -> ctypes.Array:
        """A copy of one sequence's KV (cells, positions, data) in host memory."""
        size = C.llama_state_seq_get_size(self._ctx, seq)
        buf = (ctypes.c_uint8 * size)()
        if C.llama_state_seq_get_data(self._ctx, buf, size, seq) != size:
            raise EngineError(f"could not save the KV of sequence {seq}")
        return buf

    @staticmethod
    def state_nbytes(state: ctypes.Array) -> int:
        return ctypes.sizeof(state)

    def set_seq_state(self, seq: int, state: ctypes.Array) -> None:
        """Replace sequence seq's KV with a saved one (from seq_state of any sequence)."""
        size = ctypes.sizeof(state)
        if C.llama_state_seq_set_data(self._ctx, state, size, seq) != size:
            raise EngineError(f"could not restore {size} bytes of KV into sequence {seq}")

    def close(self) -> None:
        if self._ctx:
            C.llama_batch_free(self._batch)
            C.llama_free(self._ctx)
            self._ctx = None


class EmbeddingContext:
    """A llama_context in embeddings mode for a non-causal encoder (BERT): no KV cache, one
    llama_decode computes every token's last hidden state, for many sequences at once.

    Batch invariance (an input's vector never depends on its neighbours): llama.cpp pools in
    the graph with a matmul over all the batch's tokens, so pooling is off here (the caller
    pools each sequence's own rows). The matmuls compute each row alone (measured: inputs
    packed at any offset give their rows bit for bit under the fixed-order attention), so what
    remains is the attention, which sums over the decode's keys.

    Attention is flash attention. Its CPU kernel (ggml-cpu/ops.cpp) takes a tiled path once a
    decode has FLASH_ATTN_TILE tokens: per row, keys a tile at a time, a tile wholly masked
    skipped, the tile's exponentials summed a SIMD vector at a time, the online-softmax rescale
    between tiles. Stock, a row's result so depends on how its sequence's keys fall into tiles
    and lanes, and the caller keeps that fixed (embeddings_batch.Packer's `align` and `tile`:
    about 1.3x the tokens of a tight packing). With tile_invariant_attention on the calling
    thread (scripts/install's patch), the kernel computes a row in one order wherever its keys
    fall and takes the tiled path at any number of tokens, and the caller packs tight, with no
    filler at all (local/embeddings picks, the load-time probe checks). Plain attention,
    invariant with lanes alone, computed every pair of the decode's tokens (other sequences'
    masked), and cost 2x in inputs/s on packed batches (docs/performance.md); it is what an
    engine falls back to (flash_attn=False) where the probe finds flash attention computing
    otherwise. The fixed-order kernels
    (use_fixed_order_kernels) are invariant under tight packing too, but slower: keys one at a
    time, each row reading every key's mask (0.7-0.9x the inputs/s of the tiles, measured).
    """

    def __init__(self, model: LlamaModel, n_seq: int, n_batch: int, n_threads: int,
                 flash_attn: bool = True) -> None:
        p = C.llama_context_default_params()
        p.n_ctx = p.n_batch = p.n_ubatch = n_batch   # non-causal: a sequence never spans two ubatches
        p.n_seq_max = n_seq
        p.n_threads = p.n_threads_batch = n_threads
        p.embeddings = True
        p.pooling_type = C.LLAMA_POOLING_TYPE_NONE
        p.flash_attn_type = C.LLAMA_FLASH_ATTN_TYPE_ENABLED if flash_attn else C.LLAMA_FLASH_ATTN_TYPE_DISABLED
        p.no_perf = True
        self.flash_attn = flash_attn
        self._ctx, self.buffers = _context_buffers(lambda: C.llama_init_from_model(model._model, p))
        if not self._ctx:
            raise EngineError(f"llama.cpp could not create an embeddings context of {n_batch} tokens")
        self.n_embd, self.n_batch = model.n_embd, n_batch
        self._batch = C.llama_batch_init(n_batch, 0, 1)
        self._tok = np.ctypeslib.as_array(self._batch.token, shape=(n_batch,))
        self._pos = np.ctypeslib.as_array(self._batch.pos, shape=(n_batch,))
        self._nseq = np.ctypeslib.as_array(self._batch.n_seq_id, shape=(n_batch,))
        self._want = np.ctypeslib.as_array(self._batch.logits, shape=(n_batch,))
        self._nseq[:] = 1
        self._want[:] = 1            # every token's hidden state is an output

    def encode(self, tokens: Sequence[int], positions: Sequence[int], seqs: Sequence[int]) -> np.ndarray:
        """One llama_decode; returns a copy of the hidden states, [len(tokens), n_embd] float32."""
        n = len(tokens)
        assert 0 < n <= self.n_batch
        _run_batch(self._ctx, self._batch, self._tok, self._pos, tokens, positions, seqs, "an embeddings batch")
        ptr = C.llama_get_embeddings(self._ctx)
        if not ptr:
            raise EngineError("llama.cpp returned no embeddings")
        return np.ctypeslib.as_array(ptr, shape=(n, self.n_embd)).copy()

    def close(self) -> None:
        if self._ctx:
            C.llama_batch_free(self._batch)
            C.llama_free(self._ctx)
            self._ctx = None
