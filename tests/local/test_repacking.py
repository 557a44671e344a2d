"""local/repacking: a deterministic generation engine keeps llama.cpp's repacked weights only where
a load-time probe finds every row's logits independent of how its decode was cut, and the probe's
verdict agrees with a longer, independent measurement on the real models (the Q4_0 conversion and
gemma3's Q4_K_M) on whatever CPU runs it, and both keep their repacked weights on scripts/install's
build. The probe's comparison and the verdict cache are also tested on a fake context (pure logic),
and the memory footprint's count of the repacked copies against what llama.cpp allocates."""

from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest

from modelyard import settings as settings_mod
from modelyard.local import repacking
from modelyard.local.convert import converted
from modelyard.local.ffi import ContextShape, LlamaContext, LlamaModel, system_info
from modelyard.local.footprint import MIB, estimate, reported
from modelyard.settings import EndpointSpec
from modelyard.store import ModelStore
from testkit.kernels import on_a_thread

LONG = "the river carries old stones past quiet towns where people tell long stories " * 20
LONG_TOKENS = 120
# A longer prompt than the probe's, cut more ways: 16-row GEMMs, 4-row ones, GEMVs, mixed.
LONG_CHUNKS = (LONG_TOKENS, 48, 16, 12, 7, 6, 5, 3, 2)


def _store() -> ModelStore:
    return ModelStore(settings_mod.load(env=os.environ).store_dir, progress=False)


def _all_rows(model: LlamaModel, chunk: int) -> np.ndarray:
    ctx = LlamaContext(model, ContextShape(n_seq=1, n_ctx_seq=256, n_batch=LONG_TOKENS, n_threads=1,
                                           flash_attn=True))
    try:
        ids = model.tokenize(LONG)[:LONG_TOKENS]
        rows = []
        for i in range(0, len(ids), chunk):
            part = ids[i:i + chunk]
            ctx.decode(part, list(range(i, i + len(part))), [0] * len(part), [True] * len(part))
            rows.extend(ctx.logits_row(j).copy() for j in range(len(part)))
        return np.stack(rows)
    finally:
        ctx.close()


@pytest.mark.model
@pytest.mark.parametrize("which", ["q4_0", "gemma3"])
def test_the_probe_agrees_with_a_longer_measurement(which, tmp_path):
    store = _store()
    path = (converted(store.resolve("smollm2-135m"), "q4_0", tmp_path, threads=2) if which == "q4_0"
            else store.resolve("gemma3-270m"))
    model = LlamaModel(path, repack=True)
    try:
        assert repacking.repacked(model), f"{which} has no repacked weights on this CPU"

        def measure():
            verdict = repacking.rows_agree(model, n_threads=1, flash_attn=True)
            rows = {c: _all_rows(model, c) for c in LONG_CHUNKS}
            return verdict, all(np.array_equal(rows[c], rows[LONG_TOKENS]) for c in LONG_CHUNKS)
        verdict, agree = on_a_thread(measure, fixed=True)
        assert verdict == agree, f"{which}: probe says {verdict}, 120 rows cut 9 ways say {agree}"
        # And they agree on this build: Q4_0's kernels round alike in stock llama.cpp, Q4_K's since
        # scripts/patches/ggml-cpu-q4_K-gemv-order.patch (without it, gemma3's rows differ here).
        assert agree, f"{which}: a row's logits depend on how its prompt was cut, repacked"
    finally:
        model.close()


@pytest.mark.model
def test_the_plain_layout_passes_the_probe():
    """The fallback computes each row alone: the probe must pass there, or it refuses for no reason."""
    model = LlamaModel(_store().resolve("gemma3-270m"), repack=False)
    try:
        assert not repacking.repacked(model)
        assert on_a_thread(lambda: repacking.rows_agree(model, n_threads=1, flash_attn=True), fixed=True)
    finally:
        model.close()


# -- pure logic: a fake context whose logits depend (or not) on how many rows a decode has ----------

class FakeModel:
    buffers: dict[str, float] = {}

    def tokenize(self, text: str) -> list[int]:
        return list(range(len(text.split())))

    def close(self) -> None:
        pass


def fake_context(depends_on_rows: int | None):
    class Ctx:
        def __init__(self, model, shape: ContextShape) -> None:
            self.n = 0

        def seq_rm(self, seq: int) -> None:
            pass

        def decode(self, tokens, positions, seqs, logits) -> None:
            self.rows = [(p, len(tokens)) for p in positions]

        def logits_row(self, j: int) -> np.ndarray:
            pos, n = self.rows[j]
            bump = 0.5 if depends_on_rows is not None and n == depends_on_rows else 0.0
            return np.full(4, float(pos) + bump, dtype=np.float32)

        def close(self) -> None:
            pass
    return Ctx


@pytest.mark.parametrize("rows, agree", [(None, True), (5, False), (3, False), (2, False), (4, False)])
def test_one_row_count_that_differs_fails_the_probe(monkeypatch, rows, agree):
    monkeypatch.setattr(repacking, "LlamaContext", fake_context(rows))
    assert repacking.rows_agree(FakeModel(), n_threads=1, flash_attn=True) is agree


def test_the_verdict_is_probed_once_per_file_and_shape(monkeypatch, tmp_path: Path):
    loads: list[bool] = []
    probes: list[int] = []

    class Model(FakeModel):
        def __init__(self, path: Path, repack: bool = True) -> None:
            loads.append(repack)
            self.buffers = {"CPU_Mapped": 1.0, **({"CPU_REPACK": 1.0} if repack else {})}
    monkeypatch.setattr(repacking, "LlamaModel", Model)
    monkeypatch.setattr(repacking, "rows_agree", lambda m, n_threads, flash_attn: probes.append(n_threads) or False)
    monkeypatch.setattr(repacking, "_VERDICTS", {})
    f = tmp_path / "m.gguf"
    f.write_bytes(b"x")
    assert repacking.load_for_generation(f, True, 1, True, True)[1] == "probe failed"
    assert loads == [True, False] and probes == [1]             # probed on the repacked load, reloaded plain
    assert repacking.load_for_generation(f, True, 1, True, True)[1] == "probe failed"
    assert loads == [True, False, False] and probes == [1]      # the verdict is kept: plain at once
    assert repacking.load_for_generation(f, True, 2, True, True)[1] == "probe failed"
    assert probes == [1, 2]                                     # another thread count is probed again
    assert repacking.load_for_generation(f, False, 1, True, False)[1] == "fast kernels"
    assert loads[-1] is True and probes == [1, 2]               # deterministic = false: never probed
    os.utime(f, ns=(1, 1))
    repacking.load_for_generation(f, True, 1, True, True)
    assert probes == [1, 2, 1]                                   # a file changed in place is probed again



def test_system_info_is_one_string_however_many_threads_ask():
    """The estimate reads ggml's features on the registry's threads while engines log them on
    theirs: llama.cpp's own call shares one buffer (a torn read crashed a CI server), ffi's not."""
    with ThreadPoolExecutor(8) as pool:
        got = set(pool.map(lambda _: system_info(), range(400)))
    assert len(got) == 1 and "CPU : " in next(iter(got))

def test_the_footprint_counts_the_repacked_copies():
    """Repacked tensors are copies in anonymous memory beside the file's mapped pages: a loaded
    endpoint's weights are the model's bytes plus its CPU_REPACK buffer (what the registry accounts
    once it is loaded), and only the model's bytes when nothing was repacked."""
    ctx = {"KV": 2.0, "compute": 1.0, "output": 0.5}
    plain = reported(100 * MIB, ctx, weight_buffers_mib={"CPU_Mapped": 100.0})
    packed = reported(100 * MIB, ctx, weight_buffers_mib={"CPU_Mapped": 99.5, "CPU_REPACK": 57.0})
    assert plain.weights == 100 * MIB and packed.weights == 157 * MIB
    assert packed.total - plain.total == 57 * MIB


@pytest.mark.model
@pytest.mark.parametrize("which", ["q4_0", "gemma3", "q4_1"])
def test_the_estimate_counts_the_copies_llama_cpp_repacks(which, tmp_path):
    """Before the load, the memory budget's estimate (local/footprint) counts the matrices llama.cpp
    will copy into CPU_REPACK: the same bytes as the buffer a repacked load allocates (0 where
    nothing repacks, smollm2's Q4_1), and none for an embeddings endpoint, which loads plain."""
    store = _store()
    path = {"q4_0": lambda: converted(store.resolve("smollm2-135m"), "q4_0", tmp_path, threads=2),
            "gemma3": lambda: store.resolve("gemma3-270m"),
            "q4_1": lambda: store.resolve("smollm2-135m")}[which]()
    spec = EndpointSpec(name="x", model="x", context=256, parallel=1, threads=1)
    file_bytes = estimate(path, spec, embeddings=True).weights
    counted = estimate(path, spec, embeddings=False).weights - file_bytes
    model = LlamaModel(path, repack=True)
    try:
        allocated = model.buffers.get("CPU_REPACK", 0.0) * MIB
    finally:
        model.close()
    assert abs(counted - allocated) <= 0.01 * MIB, (which, counted / MIB, allocated / MIB)
    assert (counted > 0) == (which != "q4_1")
