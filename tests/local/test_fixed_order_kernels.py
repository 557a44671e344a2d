"""ggml's fixed-order kernels, pinned to one thread (local/ffi.use_fixed_order_kernels, from
scripts/patches/ggml-cpu-thread-use-ref.patch), on the real default model: flash attention gives
bit-identical logits however a prompt is chunked on a thread that runs them, and chunk-dependent
ones on a thread of the same process that does not (so the switch is per thread, and reaches the
copy of ggml that libllama runs); the RMS_NORM+MUL fusion that thread keeps
(scripts/patches/ggml-cpu-use-ref-keeps-fusion.patch) changes no bit; an engine on a build without
them serves plain attention and says so."""

from __future__ import annotations

import asyncio
import logging
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from modelyard import settings as settings_mod
from modelyard.engine.types import EngineRequest, SamplingParams
from modelyard.local import engine as engine_mod
from modelyard.local import ffi
from modelyard.local.ffi import ContextShape, LlamaContext, LlamaModel, fixed_order_kernels, use_fixed_order_kernels
from modelyard.settings import EndpointSpec
from modelyard.store import ModelStore
from testkit.kernels import on_a_thread

pytestmark = pytest.mark.model

MODEL = "smollm2-135m"
PROMPT = "the river carries old stones past quiet towns where people tell long stories " * 12
TOKENS = 250
# 128 and 100: ggml's tiled flash attention (>= 64 queries of a sequence in a decode); 48 and 7:
# its per-key path. 250: the whole prompt in one decode.
CHUNKS = (128, 100, 48, 7, 250)


@pytest.fixture(scope="module")
def model_path() -> Path:
    return ModelStore(settings_mod.load(env=os.environ).store_dir, progress=False).resolve(MODEL)


@pytest.fixture(scope="module")
def model(model_path):
    m = LlamaModel(model_path, repack=False)
    yield m
    m.close()


def _last_logits(model: LlamaModel, chunk: int) -> np.ndarray:
    ctx = LlamaContext(model, ContextShape(n_seq=1, n_ctx_seq=512, n_batch=256, n_threads=1, flash_attn=True))
    try:
        ids = model.tokenize(PROMPT)[:TOKENS]
        for i in range(0, len(ids), chunk):
            part = ids[i:i + chunk]
            ctx.decode(part, list(range(i, i + len(part))), [0] * len(part),
                       [i + j == len(ids) - 1 for j in range(len(part))])
        return ctx.logits_row((len(ids) - 1) % chunk).copy()
    finally:
        ctx.close()


def _on_a_thread(fixed: bool, model: LlamaModel) -> dict[int, np.ndarray]:
    return on_a_thread(lambda: {c: _last_logits(model, c) for c in CHUNKS}, fixed, timeout=300)


@pytest.fixture(scope="module")
def fixed(model) -> dict[int, np.ndarray]:
    """Each chunking's last logits on a fixed-order thread (two tests read them)."""
    return _on_a_thread(True, model)


def test_flash_attention_on_the_fixed_order_thread_ignores_chunking_and_only_there(model, fixed):
    assert fixed_order_kernels(), "scripts/install builds llama.cpp with scripts/patches applied"
    for c in CHUNKS:
        assert np.array_equal(fixed[c], fixed[CHUNKS[0]]), f"chunks of {c} changed the logits"
    # the same process, another thread: ggml's own choice of path, which depends on the chunk
    fast = _on_a_thread(False, model)
    assert not np.array_equal(fast[128], fast[48])
    assert float(np.abs(fast[128] - fixed[128]).max()) > 0


# The same logits in a process whose ggml never fuses (GGML_CPU_DISABLE_FUSION is read once, when
# ggml starts: hence a process of its own).
UNFUSED = """
import sys
import numpy as np
from modelyard.local.ffi import LlamaModel
from testkit.kernels import on_a_thread
sys.path.insert(0, {tests!r})
from test_fixed_order_kernels import CHUNKS, _last_logits
m = LlamaModel({path!r}, repack=False)
out = on_a_thread(lambda: {{c: _last_logits(m, c) for c in CHUNKS}}, True, timeout=300)
np.savez({to!r}, **{{str(c): v for c, v in out.items()}})
m.close()
"""


def test_the_fusion_kept_on_the_fixed_order_thread_changes_no_bit(model_path, fixed, tmp_path):
    """The patch's premise: the fused RMS_NORM+MUL computes each row as the two ops do
    ((x * scale) * w, one row at a time), so keeping it on the fixed-order thread keeps every
    guarantee and only saves a graph node (and a barrier) per norm."""
    root = Path(__file__).resolve().parents[2]
    to = tmp_path / "unfused.npz"
    env = {**os.environ, "GGML_CPU_DISABLE_FUSION": "1",
           "PYTHONPATH": os.pathsep.join([str(root / "src"), str(root)])}
    subprocess.run([sys.executable, "-c", UNFUSED.format(tests=str(Path(__file__).parent), path=str(model_path),
                                                          to=str(to))],
                   env=env, cwd=root, check=True, timeout=300)
    unfused = np.load(to)
    for c in CHUNKS:
        assert np.array_equal(fixed[c], unfused[str(c)]), f"chunks of {c}: the fusion changed the logits"


def test_an_engine_on_a_build_without_them_runs_plain_attention_and_says_so(model_path, monkeypatch, caplog):
    monkeypatch.setattr(ffi, "use_fixed_order_kernels", lambda on=True: False)
    engine = engine_mod.LocalEngine(EndpointSpec(name="plain", model=MODEL, context=256, parallel=1, threads=1),
                                    model_path)

    async def main() -> list:
        await engine.start()
        try:
            req = EngineRequest(request_id="r1", prompt="Hello", sampling=SamplingParams(), n=1, max_tokens=2)
            return [out async for out in engine.generate(req)]
        finally:
            await engine.stop()
    with caplog.at_level(logging.WARNING, logger="modelyard.engine"):
        outputs = asyncio.run(main())
    assert outputs
    assert engine.build_info["kernels"] == {"weight_repacking": False, "flash_attention": False,
                                            "fixed_order": False,
                                            "tiled_kquant_matmul": engine.build_info["kernels"]["tiled_kquant_matmul"]}
    assert "cannot pin its reference kernels" in caplog.text
