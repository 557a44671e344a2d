"""EngineCore.step() with a weightless FakeRunner: text, finish reasons, logprobs, echo,
failures, deadlines and usage, checked against the scripted model."""

from __future__ import annotations

import time

import numpy as np
import pytest

from fake_engine import (AB, E_ACUTE, EOG, EURO, SPACE, SPECIAL, Harness, L, coin, continuation,
                         counting, encode, scripted, sure)
from modelyard.engine.types import ChoiceDelta, FinishReason, SamplingParams, Usage
from modelyard.errors import DeadlineExceeded, EngineError, InvalidRequest
from modelyard.local.core import token_text
from modelyard.local.request import RequestStatus
from modelyard.local.sampling import Sampler

GREEDY_LP3 = SamplingParams(logprobs=3)


def ref_logprobs(row: np.ndarray) -> np.ndarray:
    x = row.astype(np.float64)
    m = x.max()
    return x - (m + np.log(np.exp(x - m).sum()))


def one(h: Harness, rid: str, i: int = 0):
    res = h.result(rid)
    assert res.error is None, res.error
    assert res.usage is not None
    return res.choices[i]


# -- greedy text and finish reasons ---------------------------------------------------------

def test_greedy_follows_the_scripted_argmax() -> None:
    prompt = encode("hi")
    model = scripted(continuation(prompt, encode("there you"), after=lambda h: EOG))
    h = Harness(model=model)
    h.add("A", prompt, max_tokens=50)
    h.run()
    c = one(h, "A")
    assert c.text == "there you" and c.finish is FinishReason.STOP
    assert h.result("A").usage == Usage(2, 10)        # 9 tokens + the EOG token


@pytest.mark.parametrize("n", [1, 3])
def test_max_tokens_finishes_with_length_and_exact_count(n: int) -> None:
    h = Harness()
    h.add("A", "abc", n=n, max_tokens=4)
    h.run()
    res = h.result("A")
    for i in range(n):
        assert res.choices[i].text == "defg"
        assert res.choices[i].finish is FinishReason.LENGTH
        assert len(h.requests["A"].seqs[i].output_ids) == 4
    assert res.usage == Usage(3, 4 * n)


def test_max_tokens_one() -> None:
    h = Harness()
    h.add("A", "abc", max_tokens=1)
    h.run()
    c = one(h, "A")
    assert (c.text, c.finish, c.deltas) == ("d", FinishReason.LENGTH, ["d"])


def test_eog_stops_and_adds_no_text() -> None:
    h = Harness()
    h.add("A", "xy", max_tokens=10)                  # counting: "z", then EOG
    h.run()
    c = one(h, "A")
    assert c.text == "z" and c.finish is FinishReason.STOP
    assert h.requests["A"].seqs[0].output_ids == [L("z"), EOG]
    assert h.result("A").usage == Usage(2, 2)


def test_eog_first_token_gives_empty_text_and_stop() -> None:
    h = Harness()
    h.add("A", "z", max_tokens=10)
    h.run()
    c = one(h, "A")
    assert (c.text, c.finish) == ("", FinishReason.STOP)


def test_special_non_eog_token_renders_empty_and_generation_goes_on() -> None:
    prompt = encode("k")
    h = Harness(model=scripted(continuation(prompt, [SPECIAL, L("o"), L("k")], after=lambda h: EOG)))
    h.add("A", prompt, max_tokens=10)
    h.run()
    assert one(h, "A").text == "ok"


# -- stop strings ---------------------------------------------------------------------------

def test_stop_string_spanning_tokens_is_never_emitted() -> None:
    h = Harness()
    h.add("A", "a", stop=("cde",), max_tokens=10)    # b c d e ...
    h.run()
    c = one(h, "A")
    assert c.text == "b" and c.finish is FinishReason.STOP
    assert all("c" not in d for d in c.deltas)
    assert len(h.requests["A"].seqs[0].output_ids) == 4


def test_false_start_of_a_stop_string_is_released_later() -> None:
    h = Harness()
    h.add("A", "a", stop=("cdx",), max_tokens=6)     # b c d e f g: "cd" held until "e"
    h.run()
    c = one(h, "A")
    assert c.deltas == ["b", "cde", "f", "g"]
    assert c.text == "bcdefg" and c.finish is FinishReason.LENGTH


def test_held_stop_prefix_is_flushed_at_length() -> None:
    h = Harness()
    h.add("A", "a", stop=("cdq",), max_tokens=3)
    h.run()
    c = one(h, "A")
    assert c.text == "bcd" and c.finish is FinishReason.LENGTH
    assert c.deltas == ["b", "cd"]


def test_held_stop_prefix_is_flushed_at_eog() -> None:
    h = Harness()
    h.add("A", "x", stop=("yzq",), max_tokens=10)    # y z EOG
    h.run()
    c = one(h, "A")
    assert c.text == "yz" and c.finish is FinishReason.STOP


def test_stop_string_inside_one_token() -> None:
    prompt = encode("x")
    h = Harness(model=scripted(continuation(prompt, [L("k"), AB, L("c")])))
    h.add("A", prompt, stop=("b",), max_tokens=10)
    h.run()
    c = one(h, "A")
    assert c.text == "ka" and c.finish is FinishReason.STOP


def test_stop_string_on_the_last_allowed_token_is_stop() -> None:
    h = Harness()
    h.add("A", "a", stop=("cd",), max_tokens=3)      # b c d: the stop completes at the limit
    h.run()
    c = one(h, "A")
    assert (c.text, c.finish) == ("b", FinishReason.STOP)


def test_deltas_hold_back_every_possible_stop_start() -> None:
    prompt = encode("m")
    outs = encode("no pqr stu")                      # " pq" starts " pqz" but " pqr" does not
    h = Harness(model=scripted(continuation(prompt, outs, after=lambda h: EOG)))
    h.add("A", prompt, stop=(" pqz", "stu"), max_tokens=30)
    h.run()
    c = one(h, "A")
    assert c.text == "no pqr " and c.finish is FinishReason.STOP
    assert c.deltas == ["n", "o", " pqr", " ", ""]


# -- UTF-8 ------------------------------------------------------------------------------------

def test_utf8_character_split_over_tokens_is_held_until_whole() -> None:
    prompt = encode("c")
    script = [L("a"), *E_ACUTE, SPACE, *EURO, L("x")]
    h = Harness(model=scripted(continuation(prompt, script, after=lambda h: EOG)))
    h.add("A", prompt, max_tokens=20)
    h.run()
    c = one(h, "A")
    assert c.text == "aé €x"
    assert c.deltas == ["a", "é", " ", "€", "x", ""]
    assert all("\ufffd" not in d for d in c.deltas)


def test_utf8_character_cut_by_max_tokens_becomes_replacement() -> None:
    prompt = encode("c")
    h = Harness(model=scripted(continuation(prompt, [L("a"), *EURO])))
    h.add("A", prompt, max_tokens=3)                 # "a" + 2 of the 3 bytes of "€"
    h.run()
    c = one(h, "A")
    assert c.text == "a\ufffd" and c.finish is FinishReason.LENGTH


def test_stop_string_with_a_multibyte_character() -> None:
    prompt = encode("c")
    script = [L("a"), *E_ACUTE, L("b"), *EURO, L("x")]
    h = Harness(model=scripted(continuation(prompt, script)))
    h.add("A", prompt, stop=("b€",), max_tokens=20)
    h.run()
    c = one(h, "A")
    assert c.text == "aé" and c.finish is FinishReason.STOP


# -- logprobs ---------------------------------------------------------------------------------

def test_logprobs_match_log_softmax_of_the_scripted_rows() -> None:
    model = scripted()
    h = Harness(model=model)
    prompt = encode("abc")
    h.add("A", prompt, max_tokens=4, sampling=GREEDY_LP3)
    h.run()
    c = one(h, "A")
    out = h.requests["A"].seqs[0].output_ids
    lp = c.logprobs
    assert c.text == "defg"
    assert lp.tokens == ["d", "e", "f", "g"]
    assert lp.text_offset == [0, 1, 2, 3]
    for i, tok in enumerate(out):
        row = model(tuple(prompt + out[:i]))
        ref = ref_logprobs(row)
        assert lp.token_logprobs[i] == pytest.approx(ref[tok], abs=1e-5)
        top = list(lp.top_logprobs[i].items())
        best = np.argsort(-row, kind="stable")[:3]
        assert len(top) == 3
        assert [t for t, _ in top] == [token_text(h.vocab.piece(int(b))) for b in best]
        assert [v for _, v in top] == pytest.approx([ref[b] for b in best], abs=1e-5)
        assert [v for _, v in top] == sorted((v for _, v in top), reverse=True)


def test_logprobs_of_sampled_tokens_are_from_the_raw_row() -> None:
    """With temperature and penalties, logprobs still describe the model's distribution."""
    q = L("q")

    def nxt(hist):
        return coin(L("r"), L("s"), L("t")) if len(hist) <= 4 else sure(EOG)

    model = scripted(nxt)
    h = Harness(model=model)
    params = SamplingParams(temperature=0.7, seed=3, presence_penalty=1.5, logprobs=1)
    h.add("A", [q], max_tokens=10, sampling=params)
    h.run()
    lp = one(h, "A").logprobs
    assert len(lp.tokens) == 4
    for v in lp.token_logprobs:
        assert v == pytest.approx(np.log(1 / 3), abs=1e-4)


def test_text_offsets_match_the_concatenated_text() -> None:
    prompt = encode("c")
    script = [L("a"), AB, *E_ACUTE, SPACE, *EURO, L("x")]
    h = Harness(model=scripted(continuation(prompt, script, after=lambda h: EOG)))
    h.add("A", prompt, max_tokens=20, sampling=SamplingParams(logprobs=0))
    h.run()
    c = one(h, "A")
    lp = c.logprobs
    assert c.text == "aabé €x"
    assert len(lp.tokens) == len(script)             # the EOG token has no entry
    assert lp.tokens[:2] == ["a", "ab"]
    assert lp.tokens[2] == "bytes:\\xc3"
    # logprobs=0: no alternatives, but each sampled token's own entry, as OpenAI and vLLM send
    assert lp.top_logprobs == [{t: v} for t, v in zip(lp.tokens, lp.token_logprobs)]
    assert all(isinstance(v, float) for v in lp.token_logprobs)
    assert lp.text_offset == [0, 1, 3, 3, 4, 5, 5, 5, 6]
    for tok, off in zip(lp.tokens, lp.text_offset):
        if not tok.startswith("bytes:"):
            assert c.text[off:off + len(tok)] == tok


def test_logprobs_of_stop_string_tokens_are_dropped() -> None:
    h = Harness()
    h.add("A", "a", stop=("de",), max_tokens=10, sampling=GREEDY_LP3)   # b c [d e]
    h.run()
    c = one(h, "A")
    assert c.text == "bc"
    assert c.logprobs.tokens == ["b", "c"]
    assert c.logprobs.text_offset == [0, 1]


def test_logprobs_travel_with_their_text_across_deltas() -> None:
    h = Harness()
    h.add("A", "a", stop=("cdx",), max_tokens=6, sampling=GREEDY_LP3)
    h.run()
    res = h.result("A")
    deltas = [o for o in res.items if isinstance(o, ChoiceDelta)]
    assert [(d.text, d.logprobs.tokens) for d in deltas] == [
        ("b", ["b"]), ("cde", ["c", "d", "e"]), ("f", ["f"]), ("g", ["g"])]


def test_logprobs_with_n_choices_are_per_choice() -> None:
    h = Harness()
    h.add("A", "abc", n=2, max_tokens=3, sampling=SamplingParams(logprobs=2))
    h.run()
    res = h.result("A")
    assert res.choices[0].logprobs.tokens == res.choices[1].logprobs.tokens == ["d", "e", "f"]


# -- echo -------------------------------------------------------------------------------------

@pytest.mark.parametrize("n", [1, 2])
def test_echo_prepends_the_prompt_once(n: int) -> None:
    h = Harness()
    h.add("A", "abc", n=n, echo=True, max_tokens=3)
    h.run()
    res = h.result("A")
    for i in range(n):
        assert res.choices[i].text == "abcdef"
        assert res.choices[i].deltas[0].startswith("abc")
    assert res.usage == Usage(3, 3 * n)


def test_echo_with_stop_on_first_token() -> None:
    h = Harness()
    h.add("A", "abc", echo=True, stop=("d",), max_tokens=3)
    h.run()
    c = one(h, "A")
    assert (c.text, c.finish) == ("abc", FinishReason.STOP)


def test_echo_logprobs_score_the_prompt_across_chunks() -> None:
    model = scripted()
    h = Harness(n_slots=2, step_tokens=4, model=model)   # a 10-token prompt in 3 chunks
    prompt = encode("abcdefghij")
    h.add("A", prompt, echo=True, max_tokens=3, sampling=SamplingParams(logprobs=2))
    h.run()
    assert [p for rec in h.batches for _, *p in rec.prefills] == [[0, 4], [4, 8], [8, 10]]
    c = one(h, "A")
    lp = c.logprobs
    assert c.text == "abcdefghijklm"
    assert lp.tokens == list("abcdefghijklm")
    assert lp.text_offset == list(range(13))
    assert lp.token_logprobs[0] is None and lp.top_logprobs[0] is None
    out = h.requests["A"].seqs[0].output_ids
    full = prompt + out
    for pos in range(1, 13):
        ref = ref_logprobs(model(tuple(full[:pos])))
        assert lp.token_logprobs[pos] == pytest.approx(ref[full[pos]], abs=1e-5), pos
        top = lp.top_logprobs[pos]       # the 2 best, then the token itself if not among them
        assert len(top) == (2 if lp.tokens[pos] in list(top)[:2] else 3), (pos, top)
        assert top[lp.tokens[pos]] == pytest.approx(lp.token_logprobs[pos]), pos
    # the prompt's entries are sent once, with the first delta
    deltas = [o for o in h.result("A").items if isinstance(o, ChoiceDelta)]
    assert deltas[0].logprobs.tokens[:10] == list("abcdefghij")
    assert all(len(d.logprobs.tokens) == 1 for d in deltas[1:])


def test_echo_logprobs_disable_prefix_reuse() -> None:
    h = Harness(n_slots=1, step_tokens=16)
    h.add("A", "abcd", max_tokens=1)
    h.run()
    n = len(h.batches)
    h.add("B", "abcdef", echo=True, max_tokens=1, sampling=SamplingParams(logprobs=0))
    h.run()
    assert h.batches[n].truncations == [(0, 0)] and h.batches[n].prefills == [("B", 0, 6)]
    assert all(h.batches[n].logits)
    n = len(h.batches)
    h.add("C", "abcdefgx", echo=True, max_tokens=1)  # echo without logprobs may reuse
    h.run()
    assert h.batches[n].prefills == [("C", 6, 8)]
    assert one(h, "C").text == "abcdefgxy"


# -- failures -----------------------------------------------------------------------------------

def test_transient_decode_failure_is_retried_request_by_request() -> None:
    h = Harness(n_slots=3, step_tokens=5)
    h.add("A", "ab", max_tokens=5)
    h.step()                                          # A is decoding
    h.add("B", "klmnopq", max_tokens=2)               # its chunk takes the rest of the step
    h.runner.fail_next_decode()
    h.step()                                          # fails once; A and B are retried alone
    assert [sorted({r for r, _, _ in rec.decodes} | {r for r, _, _ in rec.prefills})
            for rec in h.batches[-3:]] == [["A", "B"], ["A"], ["B"]]
    h.run()
    assert one(h, "A").text == "cdefg" and one(h, "B").text == "rs"
    assert h.pool.n_free == 3


def test_failed_decode_fails_only_the_guilty_request_and_the_core_keeps_serving() -> None:
    h = Harness(n_slots=3, step_tokens=5)
    a = h.add("A", "ab", max_tokens=5)
    h.step()                                          # A is decoding
    b = h.add("B", "klmnopq", max_tokens=2)           # its chunk takes the rest of the step
    d = h.add("D", "uv", max_tokens=2)                # admitted, but no room this step
    h.runner.fail_decodes_touching(1)                 # B's slot-to-be is broken for good
    h.step()
    assert b.seqs[0].slot == 1
    res = h.result("B")
    assert isinstance(res.error, EngineError) and res.usage is None
    assert b.status is RequestStatus.ABORTED and a.status is RequestStatus.RUNNING
    assert d.status is RequestStatus.RUNNING
    h.runner.ctx.fail_when = None
    h.add("E", "ef", max_tokens=3)
    h.run()
    assert one(h, "A").text == "cdefg"
    assert one(h, "D").text == "wx"
    assert one(h, "E").text == "ghi"
    assert h.pool.n_free == 3


def test_runner_exception_becomes_engine_error() -> None:
    h = Harness(n_slots=2)
    h.add("A", "ab", max_tokens=3)
    h.runner.raise_in_execute = RuntimeError("boom")
    h.step()
    err = h.result("A").error
    assert isinstance(err, EngineError) and "RuntimeError" in str(err.message) and "boom" in err.message
    assert h.pool.n_free == 2
    h.add("B", "ab", max_tokens=3)
    h.run()
    assert one(h, "B").text == "cde"


def test_modelyard_error_from_the_runner_passes_through() -> None:
    h = Harness(n_slots=2)
    h.add("A", "ab", max_tokens=3)
    err = InvalidRequest("bad batch")
    h.runner.raise_in_execute = err
    h.step()
    assert h.result("A").error is err
    assert len(h.sinks["A"]) == 1


def test_model_error_after_some_output_keeps_what_was_sent() -> None:
    def nxt(hist):
        if hist[-1] == L("e"):
            raise ValueError("model blew up")
        return counting(hist)

    h = Harness(n_slots=2, model=scripted(nxt))
    h.add("A", "abc", max_tokens=5)
    h.run()
    res = h.result("A")
    assert isinstance(res.error, EngineError) and "model blew up" in res.error.message
    assert res.choices[0].text == "de" and res.choices[0].finish is None and res.usage is None
    assert h.pool.n_free == 2


def test_exception_while_updating_a_prompt_fails_that_request_alone() -> None:
    """B's sampler raises (an out-of-vocabulary logit_bias slipped past validation) as its
    prompt's call returns: B gets the error and none of its deltas; A, whose prompt was its own
    call in the same step, is answered as if alone (each prompt chunk is updated as its call
    returns: EngineCore._prefilled_early)."""
    h = Harness(n_slots=3)
    h.add("A", "abc", max_tokens=3)
    b = h.build("B", "xy", max_tokens=3)
    b.seqs[0].sampler = Sampler(SamplingParams(logit_bias={1000: 1.0}))   # what prepare() refuses
    h.sched.add(b)
    h.step()
    res = h.result("B")
    assert isinstance(res.error, EngineError) and "IndexError" in res.error.message
    assert res.items == []                        # the error is all that was sent
    h.run()
    assert one(h, "A").text == "def"
    assert h.pool.n_free == 3
    h.add("C", "abc", max_tokens=3)
    h.run()
    assert one(h, "C").text == "def"


# -- deadlines ----------------------------------------------------------------------------------

def test_deadline_expires_a_running_request() -> None:
    h = Harness(n_slots=2)
    a = h.add("A", "ab", max_tokens=10)
    h.add("B", "cd", max_tokens=4)
    h.step()
    h.step()
    a.deadline = time.monotonic() - 1
    h.run()
    res = h.result("A")
    assert isinstance(res.error, DeadlineExceeded) and res.usage is None
    assert res.choices[0].text == "cd"
    assert a.status is RequestStatus.ABORTED
    assert one(h, "B").text == "efgh"
    assert h.pool.n_free == 2
    assert sum(1 for rec in h.batches for rid, _, _ in rec.decodes if rid == "A") == 1


def test_deadline_expires_a_waiting_request_before_it_runs() -> None:
    h = Harness(n_slots=1)
    h.add("A", "ab", max_tokens=3)
    h.add("W", "xy", max_tokens=3, deadline=time.monotonic() - 1)
    h.run()
    assert isinstance(h.result("W").error, DeadlineExceeded)
    assert len(h.sinks["W"]) == 1
    assert not any(rid == "W" for rec in h.batches for rid, _, _ in rec.prefills)
    assert one(h, "A").text == "cde"


def test_future_deadline_does_not_fire() -> None:
    h = Harness(n_slots=1)
    h.add("A", "ab", max_tokens=3, deadline=time.monotonic() + 3600)
    h.run()
    assert one(h, "A").text == "cde"


# -- usage ----------------------------------------------------------------------------------------

def test_usage_once_and_last_when_choices_finish_at_different_steps() -> None:
    def nxt(hist):
        return coin(EOG, L("a"), L("b"))

    h = Harness(n_slots=4, model=scripted(nxt))
    req = h.add("A", "q", n=4, max_tokens=12, sampling=SamplingParams(temperature=1.0, seed=11))
    h.run()
    res = h.result("A")
    lens = [len(s.output_ids) for s in req.seqs]
    assert len(set(lens)) > 1                          # they did finish at different steps
    assert res.error is None
    assert isinstance(res.items[-1], Usage)
    assert sum(isinstance(o, Usage) for o in res.items) == 1
    assert res.usage == Usage(1, sum(lens))
    for i in range(4):
        finishes = [o.finish_reason for o in res.items if isinstance(o, ChoiceDelta) and o.index == i
                    and o.finish_reason is not None]
        assert len(finishes) == 1


def test_each_step_emits_once_and_each_prompt_as_its_call_returns() -> None:
    """A step's outputs go out in one emit (one hop to the event loop), except a prompt's first
    token, which goes out as its own call returns: the first step's two prompts emit twice, the
    decode steps after it once each."""
    h = Harness(n_slots=2)
    h.add("A", "ab", max_tokens=3)
    h.add("B", "cd", max_tokens=3)
    steps = h.run()
    assert [[r.id for r, _ in e] for e in h.emits[:2]] == [["A"], ["B"]]
    assert len(h.emits) == steps + 1
    assert all(len({id(r) for r, _ in e}) == len(e) for e in h.emits)   # one entry per request


def test_echo_logprobs_zero_gives_each_prompt_token_its_own_entry() -> None:
    """logprobs=0 with echo: every prompt token after the first has its logprob and its own
    top_logprobs entry (not nulls), as for sampled tokens."""
    model = scripted()
    h = Harness(model=model)
    h.add("A", encode("abcd"), echo=True, max_tokens=1, sampling=SamplingParams(logprobs=0))
    h.run()
    lp = one(h, "A").logprobs
    assert lp.token_logprobs[0] is None and lp.top_logprobs[0] is None
    assert all(isinstance(v, float) for v in lp.token_logprobs[1:])
    assert lp.top_logprobs[1:] == [{t: v} for t, v in zip(lp.tokens[1:], lp.token_logprobs[1:])]
