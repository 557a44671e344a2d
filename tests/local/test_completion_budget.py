"""completion_budget: how many tokens a request may generate in a context of a given size."""

from __future__ import annotations

import pytest

from modelyard.errors import ContextOverflow
from modelyard.local.request import completion_budget


def test_unset_max_tokens_is_the_room_the_prompt_leaves():
    assert completion_budget(None, 100, 512) == 412
    assert completion_budget(None, 511, 512) == 1


def test_a_set_max_tokens_is_kept_when_it_fits():
    assert completion_budget(16, 100, 512) == 16
    assert completion_budget(412, 100, 512) == 412      # exactly full


@pytest.mark.parametrize("max_tokens, prompt, param, words", [
    (413, 100, "max_tokens", ["100 tokens", "max_tokens is 413", "513 in all", "512"]),
    (None, 512, "messages", ["512 tokens", "no room"]),
    (None, 600, "messages", ["600 tokens", "no room"]),
])
def test_what_cannot_fit_is_a_context_overflow_naming_the_numbers(max_tokens, prompt, param, words):
    with pytest.raises(ContextOverflow) as info:
        completion_budget(max_tokens, prompt, 512)
    assert info.value.param == param and info.value.status == 400
    for w in words:
        assert w in info.value.message
