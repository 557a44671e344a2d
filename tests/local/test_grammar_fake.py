"""Structured output in the engine's pure core, on the weightless vocabulary (no model): the
production Grammars/Matcher (llguidance) over the fake tokens, the production EngineCore."""

from __future__ import annotations

import json
import re

import numpy as np
import pytest

from fake_engine import EOG, SPACE, V, Harness, L, coin, scripted
from modelyard.engine.types import Constraint, FinishReason, SamplingParams
from modelyard.errors import InvalidRequest
from modelyard.local.sampling import Sampler, log_softmax_at, nucleus


def regex(pattern: str) -> Constraint:
    return Constraint("regex", pattern, "guided_regex")


def choice(*options: str) -> Constraint:
    return Constraint("choice", json.dumps(list(options)), "guided_choice")


def run_one(h: Harness, rid: str, prompt="a", **kw):
    h.add(rid, prompt, **kw)
    h.run()
    res = h.result(rid)
    assert res.error is None, res.error
    return res


def test_the_mask_forces_the_grammar_over_what_the_model_wants():
    """The model counts (after "a" it wants "b"); the regex allows only x, y, z, three times.
    The grammar's end ends the choice at once (stop), without an extra end-token step."""
    h = Harness()
    res = run_one(h, "A", max_tokens=8, constraint=regex("[x-z]{3}"))
    c = res.choices[0]
    assert re.fullmatch("[x-z]{3}", c.text) and c.finish is FinishReason.STOP, c
    assert res.usage.completion_tokens == 3
    assert h.grammars.masks == 3


def test_choice_and_an_unconstrained_request_in_the_same_batches():
    h = Harness(n_slots=2)
    h.add("C", "a", max_tokens=8, constraint=choice("zz", "xy"))
    h.add("U", "a", max_tokens=5)
    h.run()
    assert h.result("C").choices[0].text in ("zz", "xy")
    assert h.result("U").choices[0].text == "bcdef"      # what it gives alone (counting)
    masks = h.grammars.masks
    assert masks == h.result("C").usage.completion_tokens     # only the constrained row was masked


def test_max_tokens_before_the_grammar_ends_is_length_with_the_partial_text():
    res = run_one(Harness(), "A", max_tokens=4, constraint=regex("[a-z]{10}"))
    c = res.choices[0]
    assert c.finish is FinishReason.LENGTH and len(c.text) == 4 and re.fullmatch("[a-z]{4}", c.text)


def test_end_of_generation_comes_only_when_the_grammar_allows_it():
    """A model that wants to stop at once (EOG) cannot, until the grammar is complete."""
    h = Harness(model=scripted(lambda hist: EOG))
    res = run_one(h, "A", max_tokens=10, constraint=regex("(ab|c)+d?"))
    text = res.choices[0].text
    assert re.fullmatch("(ab|c)+d?", text) and res.choices[0].finish is FinishReason.STOP, text


def test_constrained_output_is_the_same_alone_and_among_neighbours():
    """Seeded sampling on a flat-ish row: each choice's matcher and seed decide; neighbours,
    constrained or not, change nothing."""
    flat = scripted(lambda hist: coin(*range(26), SPACE))
    params = SamplingParams(temperature=1.0, seed=11)
    con = regex("[a-f ]{6}")
    alone = Harness(model=flat)
    base = run_one(alone, "A", max_tokens=10, sampling=params, constraint=con, n=2)
    busy = Harness(n_slots=6, model=flat)
    for k in range(4):
        busy.add(f"N{k}", "b" * (k + 1), max_tokens=7, sampling=SamplingParams(temperature=1.0, seed=k),
                 constraint=regex("[g-k]{5}") if k % 2 else None)
    busy.add("A", "a", max_tokens=10, sampling=params, constraint=con, n=2)
    busy.run()
    got = busy.result("A")
    assert [c.text for c in got.choices.values()] == [c.text for c in base.choices.values()]
    assert all(re.fullmatch("[a-f ]{6}", c.text) for c in got.choices.values())
    # choice 1 is the request with seed + 1, as for unconstrained requests
    one = run_one(Harness(model=flat), "B", max_tokens=10, sampling=SamplingParams(temperature=1.0, seed=12),
                  constraint=con)
    assert one.choices[0].text == got.choices[1].text


def test_logprobs_are_the_constrained_distributions_and_never_minus_infinity():
    flat = scripted(lambda hist: coin(L("a"), L("b"), L("x")))
    res = run_one(Harness(model=flat), "A", max_tokens=4, constraint=regex("[ab]{2}"),
                  sampling=SamplingParams(logprobs=5))
    lp = res.choices[0].logprobs
    assert len(lp.tokens) == 2
    for top in lp.top_logprobs:
        # "x" is likely but forbidden; "ab" (one token) is allowed where two letters still fit
        assert set(top) <= {"a", "b", "ab"} and all(np.isfinite(v) for v in top.values()), top
        # the two likely allowed tokens share the constrained mass: 1/2 each
        assert top["a"] == pytest.approx(np.log(0.5)) and top["b"] == pytest.approx(np.log(0.5)), top
    assert "ab" not in lp.top_logprobs[1]     # after one letter, a two-letter token no longer fits


def test_a_grammar_that_does_not_compile_is_refused_before_any_step():
    h = Harness()
    with pytest.raises(InvalidRequest) as err:
        h.build("A", "a", constraint=regex("(a"))
    assert err.value.param == "guided_regex" and "unclosed group" in err.value.message
    assert h.grammars.failed == 1 and not h.sched.waiting


def test_compiled_grammars_are_cached_by_constraint():
    h = Harness()
    for rid in "ABC":
        h.build(rid, "a", constraint=regex("[x-z]+"))
    assert h.grammars.compiled == 1 and h.grammars.cache_hits == 2


@pytest.mark.parametrize("top_p", [1.0, 0.7])
def test_sampling_a_masked_row_equals_sampling_among_the_allowed_tokens_only(top_p):
    """Dense (the whole row, -inf where forbidden) and sparse (only the allowed ids) draw the
    same token for the same seed: the mask never shifts the random stream or the nucleus."""
    rng = np.random.default_rng(5)
    for trial in range(200):
        row = rng.normal(0, 3, V).astype(np.float32)
        allowed = np.sort(rng.choice(V, size=int(rng.integers(1, V)), replace=False))
        dense = np.full(V, -np.inf, np.float32)
        dense[allowed] = row[allowed]
        params = SamplingParams(temperature=0.8, top_p=top_p, seed=trial)
        token = Sampler(params).sample(dense).token
        # the sparse reference: the same draw over the allowed ids alone
        probs = np.exp((row[allowed] - row[allowed].max()) * np.float32(1 / 0.8), dtype=np.float32)
        ids = nucleus(probs, top_p) if top_p < 1 else np.arange(len(allowed))
        cum = np.cumsum(probs[ids], dtype=np.float64)
        u = np.random.Generator(np.random.PCG64(trial)).random()
        i = min(int(np.searchsorted(cum, u * cum[-1], "right")), len(cum) - 1)
        assert token == allowed[ids[i]], trial
        assert np.isfinite(log_softmax_at(dense, np.array([token]))).all()


def test_a_slow_compile_costs_only_its_own_request(monkeypatch):
    """Compiles that take long (an adversarial schema) use their own compilers and time: a small
    grammar submitted meanwhile compiles at once, and the slow ones are 400s after their own
    COMPILE_TIMEOUT, counted from when each started."""
    import threading
    import time as _time

    from modelyard.local import grammar as g
    monkeypatch.setattr(g, "COMPILE_TIMEOUT", 0.3)
    h = Harness()
    real = h.grammars._compile
    release = threading.Event()

    def slow_or_fast(c):
        if c.source.startswith("slow"):
            release.wait(5)
        return real(c)
    monkeypatch.setattr(h.grammars, "_compile", slow_or_fast)
    errors = []

    def slow(k):
        try:
            h.grammars.matchers(regex(f"slow{k}[a-z]"), 1)
        except InvalidRequest as exc:
            errors.append(exc)
    threads = [threading.Thread(target=slow, args=(k,)) for k in range(2)]
    for t in threads:
        t.start()
    _time.sleep(0.05)
    assert len(h.grammars.matchers(regex("[x-z]+"), 1)) == 1     # not queued behind the slow two
    for t in threads:
        t.join(5)
    release.set()
    assert len(errors) == 2 and all("did not compile within 0.3 s" in e.message for e in errors)
