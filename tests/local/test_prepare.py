"""prepare(): the production request builder, on the weightless vocabulary (no model)."""

from __future__ import annotations

import pytest

from fake_engine import EURO, SPACE, FakeVocab, L
from modelyard.engine.types import EngineRequest, SamplingParams
from modelyard.errors import InvalidRequest
from modelyard.local.prepare import detokenize, prepare


def build(prompt, **kw):
    r = EngineRequest("r", prompt if isinstance(prompt, str) else tuple(prompt), **kw)
    return prepare(r, FakeVocab(), None, context=32, parallel=4, parse_special=False, sink=lambda _: None)


@pytest.mark.parametrize("prompt, kw, param, words", [
    ("", {}, "prompt", "empty"),
    ([1, 40], {}, "prompt", "prompt holds token 40, which is outside the vocabulary (0..39)"),
    ([-1], {}, "prompt", "token -1, which is outside"),
    ("ab", {"sampling": SamplingParams(logit_bias={99: 1.0})}, "logit_bias", "token 99, outside"),
    ("ab", {"n": 5}, "n", "n is 5, but this endpoint runs at most 4"),
    ("ab", {"max_tokens": 31}, "max_tokens", "31"),
])
def test_bad_requests_name_the_field_and_the_value(prompt, kw, param, words):
    with pytest.raises(InvalidRequest) as err:
        build(prompt, **kw)
    assert err.value.param == param and words in err.value.message, err.value.message


def test_unset_max_tokens_is_the_room_left_and_choices_get_their_own_seeds():
    req = build("abcd", max_tokens=None, n=3, sampling=SamplingParams(temperature=1.0, seed=7))
    assert req.prompt_ids == [L("a"), L("b"), L("c"), L("d")] and req.max_tokens == 32 - 4
    assert [s.sampler.params.seed for s in req.seqs] == [7, 8, 9]


def test_echo_of_token_ids_is_their_text_with_offsets_per_token():
    ids = [L("a"), SPACE, *EURO, L("b")]
    req = build(ids, echo=True, sampling=SamplingParams(logprobs=0))
    assert req.echo_text == "a €b" == detokenize(FakeVocab(), ids)
    # the euro sign's three byte tokens all start where the character starts
    assert req.prompt_logprobs.text_offset == [0, 1, 2, 2, 2, 3]
