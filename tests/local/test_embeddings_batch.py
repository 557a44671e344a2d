"""The embeddings batch, without a model: FIFO packing across requests, lane alignment with the
filler sequence, the per-decode limits, and pooling + normalisation."""

from __future__ import annotations

from collections import deque

import numpy as np
import pytest

from modelyard.local.embeddings_batch import FILLER_TOKEN, EmbedJob, Packed, Packer, invariant, pool


def job(name: str, *lengths: int) -> EmbedJob:
    return EmbedJob(name, [[100 + n] * n for n in lengths], finish=lambda _: None)


def test_each_input_starts_at_a_lane_multiple_and_gaps_are_the_filler_sequence():
    packer = Packer(max_seqs=4, max_tokens=64, align=8)
    a, b = job("a", 3, 8), job("b", 10)

    packed = packer.pack(deque([a, b]))

    assert [(s.job.id, s.index, s.offset, s.length) for s in packed.spans] == [
        ("a", 0, 0, 3), ("a", 1, 8, 8), ("b", 0, 16, 10)]
    assert len(packed.tokens) == 32 and len(packed.tokens) % 8 == 0
    assert packed.seqs[:8] == [0, 0, 0, 4, 4, 4, 4, 4]             # 4 = the filler's sequence id
    assert packed.tokens[3:8] == [FILLER_TOKEN] * 5
    assert packed.positions[:8] == [0, 1, 2, 0, 0, 0, 0, 0]          # filler positions never decrease
    assert packed.positions[16:26] == list(range(10))
    assert packed.padding == 32 - 21
    assert (a.next, b.next) == (2, 1)


def test_under_a_tile_an_input_never_crosses_a_boundary_it_could_start_on():
    """Flash attention's tiles (ffi.FLASH_ATTN_TILE): an input that fits in what is left of the
    tile goes there, at a lane multiple; one that does not, or is longer than a tile, starts on
    the next boundary, and the gap it leaves takes a later input short enough."""
    packer = Packer(max_seqs=8, max_tokens=256, align=8, tile=32)
    a = job("a", 10, 12, 20, 40, 5, 9)

    packed = packer.pack(deque([a]))

    assert [(s.offset, s.length) for s in packed.spans] == [
        (0, 10), (16, 12), (32, 20), (64, 40), (56, 5), (104, 9)]   # the 5 in the gap the 40 left
    assert packed.seqs[28:32] == [8] * 4 and packed.tokens[28:32] == [FILLER_TOKEN] * 4   # 12 ends at 28
    assert packed.seqs[56:61] == [4] * 5 and packed.positions[56:61] == list(range(5))
    assert packed.seqs[61:64] == [8] * 3 and packed.tokens[61:64] == [FILLER_TOKEN] * 3
    assert len(packed.tokens) == len(packed.seqs) == len(packed.positions) == 120   # the 9 ends at 113
    assert packed.padding == 120 - 96
    for s in packed.spans:           # each one in one tile, or from a boundary
        assert s.offset % 8 == 0
        assert s.offset // 32 == (s.offset + s.length - 1) // 32 or s.offset % 32 == 0
        assert packed.tokens[s.offset:s.offset + s.length] == [100 + s.length] * s.length


def test_under_a_tile_a_decode_has_at_least_one_tile_and_the_gap_counts_against_the_budget():
    packer = Packer(max_seqs=8, max_tokens=64, align=8, tile=32)
    alone = packer.pack(deque([job("a", 3)]))
    assert len(alone.tokens) == 32 and alone.seqs[3:] == [8] * 29       # below a tile ggml switches kernel
    assert packer.capacity(3) == 32 and packer.capacity(40) == 40

    b = job("b", 20, 20, 20)     # 0-20, 32-52 (24-44 would cross 32), then 64-88 passes the 64 tokens
    packed = packer.pack(deque([b]))
    assert [(s.offset, s.length) for s in packed.spans] == [(0, 20), (32, 20)]
    assert [s.index for s in packer.pack(deque([b])).spans] == [2]


def test_the_tile_is_a_multiple_of_the_lanes():
    with pytest.raises(ValueError, match="multiple of the lane alignment"):
        Packer(max_seqs=8, max_tokens=64, align=16, tile=24)


def test_a_batch_stops_at_max_seqs_and_the_rest_waits_in_order():
    packer = Packer(max_seqs=2, max_tokens=64, align=8)
    a, b = job("a", 4, 4, 4), job("b", 4)
    jobs = deque([a, b])

    first = packer.pack(jobs)
    second = packer.pack(jobs)

    assert [(s.job.id, s.index) for s in first.spans] == [("a", 0), ("a", 1)]
    assert [(s.job.id, s.index) for s in second.spans] == [("a", 2), ("b", 0)]
    assert packer.pack(jobs) is None


def test_a_batch_stops_before_the_input_that_would_pass_max_tokens():
    packer = Packer(max_seqs=8, max_tokens=32, align=8)
    a = job("a", 9, 9, 3)          # 16 + 16 fill the batch; the third waits

    packed = packer.pack(deque([a]))

    assert [s.index for s in packed.spans] == [0, 1]
    assert len(packed.tokens) == 32
    assert [s.index for s in packer.pack(deque([a])).spans] == [2]


def test_a_job_is_complete_once_every_input_has_its_vector():
    a = job("a", 3, 3)
    a.done, a.tokens, a.vectors = 2, 6, [(1.0,), (0.0,)]
    assert a.complete and a.result().prompt_tokens == 6 and a.result().vectors == ((1.0,), (0.0,))


@pytest.mark.parametrize("how, expected", [("mean", [2.0, 3.0]), ("cls", [1.0, 2.0]), ("last", [3.0, 4.0])])
def test_pooling_then_l2_normalisation(how, expected):
    rows = np.array([[1.0, 2.0], [3.0, 4.0]], dtype=np.float32)

    v = np.array(pool(rows, how))

    want = np.array(expected) / np.linalg.norm(expected)
    assert np.allclose(v, want, atol=1e-7)
    assert abs(np.linalg.norm(v) - 1.0) < 1e-6


def test_an_aborted_job_leaves_the_engine_threads_queue_before_any_of_its_inputs_run(tmp_path):
    """What the engine thread does with its inbox (EmbeddingEngine._drain), without a model."""
    from modelyard.local.embeddings import EmbeddingEngine
    from modelyard.settings import EndpointSpec

    engine = EmbeddingEngine(EndpointSpec(name="e"), tmp_path / "unused.gguf")
    finished: list[object] = []
    kept, aborted = job("kept", 3), job("aborted", 3)
    aborted.finish = finished.append
    for message in (("add", kept), ("add", aborted), ("abort", aborted)):
        engine._inbox.put(message)

    assert engine._drain(block=False) is True
    assert list(engine._jobs) == [kept] and finished == []     # nobody waits for the aborted one


def test_an_input_longer_than_the_budget_runs_alone():
    packer = Packer(max_seqs=8, max_tokens=16, align=8)
    a = job("a", 40, 3)

    first, second = packer.pack(deque([a])), packer.pack(deque([a]))

    assert [s.index for s in first.spans] == [0] and len(first.tokens) == 40
    assert [s.index for s in second.spans] == [1]


def test_batch_jobs_take_only_the_room_interactive_jobs_leave():
    """issue 23: a batch's inputs never go before an interactive request's, whenever it came;
    with room left they fill it, and alone they take the whole decode."""
    packer = Packer(max_seqs=3, max_tokens=64, align=8)
    background = EmbedJob("batch", [[7] * 8] * 4, finish=lambda _: None, batch=True)
    first = packer.pack(deque([background]))
    assert [(s.job.id, s.index) for s in first.spans] == [("batch", 0), ("batch", 1), ("batch", 2)]
    late = job("interactive", 8, 8)
    second = packer.pack(deque([background, late]))         # the batch job came first, and waits
    assert [(s.job.id, s.index) for s in second.spans] == [("interactive", 0), ("interactive", 1), ("batch", 3)]
    assert second.spans[0].offset == 0


def test_the_load_probe_passes_a_kernel_that_computes_each_row_from_its_own_sequence():
    packer = Packer(max_seqs=8, max_tokens=256, align=8, tile=32)
    own = lambda p: np.array([[t, pos] for t, pos in zip(p.tokens, p.positions)], np.float32)   # noqa: E731
    assert invariant(packer, own, [5, 6, 7], longest=128)


def test_the_load_probe_fails_a_kernel_whose_rows_depend_on_where_they_sit():
    packer = Packer(max_seqs=8, max_tokens=256, align=8, tile=32)
    seen: list[Packed] = []

    def by_offset(p: Packed) -> np.ndarray:       # as a 64-key tile would under a 32-token packing
        seen.append(p)
        return np.array([[t, j % 64] for j, t in enumerate(p.tokens)], np.float32)

    assert not invariant(packer, by_offset, [5, 6, 7], longest=128)
    assert max(len(p.spans) for p in seen) > 1 and min(len(p.spans) for p in seen) == 1   # together, then alone
