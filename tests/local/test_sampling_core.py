"""sampling.py: seeded draws, temperature, top_p, logit_bias, penalties, logprob helpers."""

from __future__ import annotations

import numpy as np
import pytest

from modelyard.engine.types import SamplingParams
from modelyard.local.sampling import Sampler, log_softmax_at, nucleus, top_k


def draws(params: SamplingParams, row: np.ndarray, n: int) -> list[int]:
    s = Sampler(params)
    return [s.sample(row).token for _ in range(n)]


def softmax(x: np.ndarray) -> np.ndarray:
    z = np.exp(x.astype(np.float64) - x.max())
    return z / z.sum()


def chi2(counts: np.ndarray, probs: np.ndarray) -> float:
    exp = probs * counts.sum()
    return float(((counts - exp) ** 2 / exp).sum())


ROW10 = np.linspace(0.0, 1.0, 10).astype(np.float32)
ROW5 = np.array([0.0, 0.5, 1.0, 1.5, 2.0], np.float32)
CHI2_DF4_LIMIT = 18.47          # p = 0.001 for 4 degrees of freedom


# -- seeds ------------------------------------------------------------------------------------

def test_same_seed_same_tokens() -> None:
    p = SamplingParams(temperature=1.0, seed=1234)
    a, b = draws(p, ROW10, 50), draws(p, ROW10, 50)
    assert a == b
    assert len(set(a)) > 3                      # it really sampled


def test_different_seeds_differ() -> None:
    a = draws(SamplingParams(temperature=1.0, seed=1), ROW10, 50)
    b = draws(SamplingParams(temperature=1.0, seed=2), ROW10, 50)
    assert a != b


def test_choice_seeds_are_seed_plus_index() -> None:
    base = SamplingParams(temperature=1.0, seed=7)
    assert draws(base.for_choice(3), ROW10, 30) == draws(SamplingParams(temperature=1.0, seed=10), ROW10, 30)
    assert draws(base.for_choice(0), ROW10, 30) != draws(base.for_choice(1), ROW10, 30)


def test_unseeded_samplers_differ() -> None:
    p = SamplingParams(temperature=1.0)
    assert draws(p, ROW10, 50) != draws(p, ROW10, 50)


def test_greedy_is_argmax_with_lowest_index_on_ties() -> None:
    row = np.array([0.0, 3.0, 1.0, 3.0], np.float32)
    assert draws(SamplingParams(), row, 5) == [1] * 5


# -- temperature ------------------------------------------------------------------------------

@pytest.mark.parametrize("temperature", [1.0, 0.5, 2.0])
def test_draws_follow_the_tempered_softmax(temperature: float) -> None:
    n = 4000
    got = np.bincount(draws(SamplingParams(temperature=temperature, seed=0), ROW5, n), minlength=5)
    assert chi2(got, softmax(ROW5 / temperature)) < CHI2_DF4_LIMIT
    # and the temperature matters: the untempered distribution is rejected
    if temperature != 1.0:
        assert chi2(got, softmax(ROW5)) > 5 * CHI2_DF4_LIMIT


def test_low_temperature_approaches_greedy() -> None:
    assert set(draws(SamplingParams(temperature=0.01, seed=5), ROW5, 200)) == {4}


@pytest.mark.parametrize("top_p", [1.0, 0.5, 5e-324])
@pytest.mark.parametrize("temperature", [5e-324, 1e-300, 1e-39])
def test_a_temperature_too_small_for_float32_is_its_limit_not_a_crash(temperature: float, top_p: float) -> None:
    """1/temperature past float32's range made 0 x inf = NaN at the row's maximum, an empty
    nucleus and an IndexError (a 500, found by the fuzzer): the draw is the limit instead, the
    maximum, and ties at it are still drawn from."""
    assert set(draws(SamplingParams(temperature=temperature, top_p=top_p, seed=3), ROW5, 50)) == {4}
    tied = np.array([0.0, 2.0, 1.0, 2.0], np.float32)
    assert set(draws(SamplingParams(temperature=temperature, top_p=top_p, seed=3), tied, 200)) <= {1, 3}
    if top_p == 1.0:
        assert set(draws(SamplingParams(temperature=temperature, seed=3), tied, 200)) == {1, 3}


# -- top_p ------------------------------------------------------------------------------------

NUCLEUS_ROW = np.log(np.array([0.5, 0.3, 0.15, 0.05])).astype(np.float32)


@pytest.mark.parametrize("top_p,nucleus", [(0.7, {0, 1}), (0.4, {0}), (0.9, {0, 1, 2}), (1.0, {0, 1, 2, 3})])
def test_top_p_draws_only_from_the_nucleus(top_p: float, nucleus: set[int]) -> None:
    got = draws(SamplingParams(temperature=1.0, top_p=top_p, seed=42), NUCLEUS_ROW, 500)
    assert set(got) == nucleus
    if nucleus == {0, 1}:                        # renormalised inside: 5:3
        assert abs(got.count(0) / 500 - 0.625) < 0.07


@pytest.mark.parametrize("k,allowed", [(1, {0}), (2, {0, 1}), (3, {0, 1, 2}), (0, {0, 1, 2, 3}), (9, {0, 1, 2, 3})])
def test_top_k_draws_only_from_the_k_most_likely(k: int, allowed: set[int]) -> None:
    got = draws(SamplingParams(temperature=1.0, top_k=k, seed=7), NUCLEUS_ROW, 600)
    assert set(got) == allowed
    if k == 2:                                   # renormalised among the two: 5:3
        assert abs(got.count(0) / 600 - 0.625) < 0.07


def test_top_k_and_top_p_both_apply_and_seeds_still_decide() -> None:
    both = SamplingParams(temperature=1.0, top_k=3, top_p=0.7, seed=3)
    assert set(draws(both, NUCLEUS_ROW, 400)) == {0, 1}      # top_p's nucleus inside the top 3
    assert draws(both, NUCLEUS_ROW, 50) == draws(both, NUCLEUS_ROW, 50)


def test_top_p_with_unsorted_logits() -> None:
    row = NUCLEUS_ROW[[2, 0, 3, 1]]              # same distribution, shuffled ids
    got = draws(SamplingParams(temperature=1.0, top_p=0.7, seed=3), row, 500)
    assert set(got) == {1, 3}


def reference_nucleus(probs: np.ndarray, top_p: float) -> np.ndarray:
    """The slow, obvious definition: sort everything (stable), cut where the mass reaches top_p."""
    order = np.argsort(-probs, kind="stable")
    cum = np.cumsum(probs[order])
    return order[: int(np.searchsorted(cum, top_p * probs.sum())) + 1]


@pytest.mark.parametrize("vocab,temperature,top_p,ties", [
    (49_152, 0.8, 0.95, False),     # smollm2's row at the sampled benchmark's settings
    (262_144, 0.8, 0.95, False),    # gemma3's
    (262_144, 5.0, 0.99, False),    # nearly flat: the head must grow to most of the row
    (1_000, 1.0, 0.5, True),        # many exact ties at every cut
    (50, 1.0, 1.0 - 1e-9, False),   # the whole row
])
def test_nucleus_equals_a_full_stable_sort(vocab: int, temperature: float, top_p: float, ties: bool) -> None:
    rng = np.random.default_rng(vocab)
    for _ in range(5):
        logits = rng.normal(0, 3, vocab).astype(np.float32)
        if ties:
            logits = np.round(logits)
        probs = np.exp((logits.astype(np.float64) - logits.max()) / temperature)
        assert nucleus(probs, top_p).tolist() == reference_nucleus(probs, top_p).tolist()


# -- logit_bias --------------------------------------------------------------------------------

def test_logit_bias_minus_100_bans_a_token() -> None:
    row = np.array([0.0, 3.0, 1.0], np.float32)
    assert draws(SamplingParams(logit_bias={1: -100.0}), row, 3) == [2, 2, 2]
    flat = np.zeros(5, np.float32)
    got = draws(SamplingParams(temperature=1.0, seed=9, logit_bias={2: -100.0}), flat, 500)
    assert 2 not in got and set(got) == {0, 1, 3, 4}


def test_logit_bias_plus_100_forces_a_token() -> None:
    got = draws(SamplingParams(temperature=1.0, seed=9, logit_bias={3: 100.0}), ROW5, 100)
    assert set(got) == {3}


def test_logit_bias_leaves_logprobs_raw() -> None:
    row = np.array([0.0, 3.0, 1.0], np.float32)
    s = Sampler(SamplingParams(logit_bias={1: -100.0}, logprobs=1)).sample(row)
    assert s.token == 2
    assert s.logprob == pytest.approx(float(np.log(softmax(row)[2])), abs=1e-6)
    assert s.top[0][0] == 1                      # the model's own favourite


# -- penalties --------------------------------------------------------------------------------

def reference_penalised(row: np.ndarray, n: int, presence: float, frequency: float) -> list[int]:
    counts: dict[int, int] = {}
    out = []
    for _ in range(n):
        x = row.astype(np.float64).copy()
        for t, c in counts.items():
            x[t] -= frequency * c + presence
        t = int(np.argmax(x))
        counts[t] = counts.get(t, 0) + 1
        out.append(t)
    return out


PEN_ROW = np.array([2.0, 1.5, 1.0, 0.0], np.float32)


@pytest.mark.parametrize("presence,frequency", [(0.0, 0.3), (1.0, 0.0), (0.4, 0.2), (0.0, 0.0)])
def test_penalties_change_greedy_choice_as_counts_accumulate(presence: float, frequency: float) -> None:
    got = draws(SamplingParams(presence_penalty=presence, frequency_penalty=frequency), PEN_ROW, 12)
    assert got == reference_penalised(PEN_ROW, 12, presence, frequency)
    if presence or frequency:
        assert len(set(got)) > 1
    else:
        assert set(got) == {0}


def test_frequency_penalty_sequence() -> None:
    # 0 (2.0), 0 (1.7 > 1.5), 1 (1.5 > 1.4), 0 (1.4 > 1.2), ...
    got = draws(SamplingParams(frequency_penalty=0.3), PEN_ROW, 4)
    assert got == [0, 0, 1, 0]


def test_negative_presence_penalty_encourages_repetition() -> None:
    row = np.array([1.0, 1.2], np.float32)
    assert draws(SamplingParams(presence_penalty=-1.0), row, 5) == [1] * 5
    assert draws(SamplingParams(presence_penalty=1.0), row, 3) == [1, 0, 1]


def test_penalties_leave_logprobs_raw() -> None:
    s = Sampler(SamplingParams(frequency_penalty=5.0, logprobs=0))
    first, second = s.sample(PEN_ROW), s.sample(PEN_ROW)
    assert (first.token, second.token) == (0, 1)
    ref = np.log(softmax(PEN_ROW))
    assert second.logprob == pytest.approx(ref[1], abs=1e-6)
    # logprobs=0: no alternatives, but the sampled token's own entry (OpenAI's legacy contract)
    assert [t for t, _ in second.top] == [1] and second.top[0][1] == pytest.approx(ref[1])


def test_top_logprobs_include_the_sampled_token_even_below_the_k_best() -> None:
    """The penalty makes the second draw token 1, which is not the raw row's best: the k = 1
    best (token 0) come first, then the sampled token, k + 1 entries, all from the raw row."""
    s = Sampler(SamplingParams(frequency_penalty=5.0, logprobs=1))
    first, second = s.sample(PEN_ROW), s.sample(PEN_ROW)
    ref = np.log(softmax(PEN_ROW))
    assert first.token == 0 and [t for t, _ in first.top] == [0]    # already among the best
    assert second.token == 1
    assert [t for t, _ in second.top] == [0, 1]
    assert [v for _, v in second.top] == pytest.approx([ref[0], ref[1]])


# -- log_softmax_at and top_k --------------------------------------------------------------------

def ref_log_softmax(row: np.ndarray) -> np.ndarray:
    x = row.astype(np.float64)
    m = x.max()
    return x - (m + np.log(np.exp(x - m).sum()))


@pytest.mark.parametrize("scale", [0.1, 10.0, 300.0])
def test_log_softmax_at_equals_float64_reference(scale: float) -> None:
    rng = np.random.default_rng(int(scale * 10))
    row = (rng.standard_normal(2000) * scale).astype(np.float32)
    ids = rng.integers(0, 2000, 50)
    got = log_softmax_at(row, ids)
    assert got.dtype == np.float64
    np.testing.assert_allclose(got, ref_log_softmax(row)[ids], rtol=1e-7, atol=1e-5)


def test_log_softmax_at_extremes() -> None:
    row = np.array([1e4, 0.0, -1e4, 1e4], np.float32)
    got = log_softmax_at(row, np.arange(4))
    np.testing.assert_allclose(got, [np.log(0.5), -1e4 + np.log(0.5), -2e4 + np.log(0.5), np.log(0.5)],
                               rtol=1e-9, atol=1e-6)
    assert np.isfinite(got).all()
    assert np.exp(log_softmax_at(ROW5, np.arange(5))).sum() == pytest.approx(1.0, abs=1e-9)


def reference_top_k(row: np.ndarray, k: int) -> list[int]:
    return sorted(range(len(row)), key=lambda i: (-float(row[i]), i))[:k]


def test_top_k_orders_largest_first() -> None:
    rng = np.random.default_rng(0)
    for _ in range(50):
        row = rng.standard_normal(100).astype(np.float32)
        for k in (1, 2, 5, 20, 100):
            assert top_k(row, k).tolist() == reference_top_k(row, k)


def test_top_k_ties_lower_index_first_within_the_selection() -> None:
    row = np.array([1.0, 5.0, 5.0, 2.0, 5.0], np.float32)
    assert top_k(row, 3).tolist() == [1, 2, 4]
    assert top_k(row, 5).tolist() == [1, 2, 4, 3, 0]


def test_top_k_ties_at_the_boundary_keep_the_lower_index() -> None:
    """Docstring: "ties: lower index first". At the cut, argpartition keeps an arbitrary one
    of the tied entries: [1, 1, 2, 2] with k=1 gives [3], while greedy picks 2."""
    assert top_k(np.array([1.0, 1.0, 2.0, 2.0], np.float32), 1).tolist() == [2]
    rng = np.random.default_rng(1)
    for _ in range(300):
        n = int(rng.integers(2, 12))
        row = rng.integers(0, 3, n).astype(np.float32)
        for k in range(1, n + 1):
            assert top_k(row, k).tolist() == reference_top_k(row, k), (row, k)


def test_greedy_token_heads_its_own_top_logprobs() -> None:
    row = np.array([1.0, 1.0, 2.0, 2.0], np.float32)
    s = Sampler(SamplingParams(logprobs=1)).sample(row)
    assert s.token == 2
    assert s.top[0][0] == s.token
