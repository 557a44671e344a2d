from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from modelyard.local.stop import StopMatcher


def reference(text: str, stops: list[str]) -> tuple[str, bool]:
    """Slow, obvious spec: scan end positions left to right; at the first
    position where any stop string ends, cut before the earliest-starting stop
    ending there."""
    stops = [s for s in stops if s]
    for end in range(1, len(text) + 1):
        starts = [end - len(s) for s in stops if text[:end].endswith(s)]
        if starts:
            return text[: min(starts)], True
    return text, False


def reference_min_start(text: str, stops: list[str]) -> str:
    """'Earliest start over the whole text' rule; agrees with ``reference``
    whenever no stop contains another stop strictly inside it."""
    starts = [i for s in stops if s for i in range(len(text)) if text.startswith(s, i)]
    return text[: min(starts)] if starts else text


def run(pieces: list[str], stops: list[str]) -> tuple[list[str], bool]:
    m = StopMatcher(stops)
    outs: list[str] = []
    for p in pieces:
        out, stopped = m.push(p)
        outs.append(out)
        if stopped:
            return outs, True
    outs.append(m.flush())
    return outs, False


def test_no_stops_passthrough() -> None:
    m = StopMatcher([])
    assert m.push("hello") == ("hello", False)
    assert m.held == ""
    assert m.flush() == ""


def test_empty_stop_string_ignored() -> None:
    assert run(["abc"], [""]) == (["abc", ""], False)


def test_stop_within_one_push() -> None:
    assert run(["Hello STOP world"], ["STOP"]) == (["Hello "], True)


def test_stop_spanning_pushes() -> None:
    m = StopMatcher(["</s>"])
    assert m.push("foo <") == ("foo ", False)
    assert m.held == "<"
    assert m.push("/") == ("", False)
    assert m.held == "</"
    assert m.push("s> tail") == ("", True)
    assert m.held == ""


def test_stop_at_very_start() -> None:
    assert run(["STOP", "more"], ["STOP"]) == ([""], True)
    assert run(["S", "T", "OP"], ["STOP"]) == (["", "", ""], True)


def test_held_prefix_not_a_stop_is_released() -> None:
    m = StopMatcher(["abc"])
    assert m.push("xab") == ("x", False)
    assert m.held == "ab"
    assert m.push("x") == ("abx", False)
    assert m.held == ""


def test_release_keeps_new_possible_prefix() -> None:
    m = StopMatcher(["aab"])
    assert m.push("a") == ("", False)
    assert m.push("a") == ("", False)
    assert m.push("a") == ("a", False)  # "aaa": suffix "aa" may still start "aab"
    assert m.held == "aa"
    assert m.push("b") == ("", True)


def test_flush_releases_hold_back() -> None:
    m = StopMatcher(["###"])
    assert m.push("text ##") == ("text ", False)
    assert m.flush() == "##"
    assert m.held == ""


def test_overlapping_abc_bcd() -> None:
    assert run(["abcd"], ["abc", "bcd"]) == ([""], True)
    assert run(["xbcd"], ["abc", "bcd"]) == (["x"], True)
    m = StopMatcher(["abc", "bcd"])
    assert m.push("ab") == ("", False)
    assert m.push("cd") == ("", True)  # "abc" completes first


def test_overlapping_ab_b() -> None:
    # Both end at the same position: cut before the earlier start.
    assert run(["xab"], ["ab", "b"]) == (["x"], True)
    assert run(["xa", "b"], ["ab", "b"]) == (["x", ""], True)
    assert run(["xb"], ["ab", "b"]) == (["x"], True)


def test_same_start_shorter_completes_first() -> None:
    m = StopMatcher(["abc", "ab"])
    assert m.push("x") == ("x", False)
    assert m.push("a") == ("", False)
    assert m.push("b") == ("", True)  # no waiting for a possible "c"


def test_interior_stop_completes_first() -> None:
    # "bc" completes before "abcd" could; we stop right there (documented).
    assert run(["xabcd"], ["abcd", "bc"]) == (["xa"], True)
    assert run(["xa", "b", "c", "d"], ["abcd", "bc"]) == (["x", "", "a"], True)


def test_push_after_stop_asserts() -> None:
    m = StopMatcher(["s"])
    assert m.push("s") == ("", True)
    with pytest.raises(AssertionError):
        m.push("more")
    assert m.flush() == ""


def test_hold_is_bounded_by_longest_stop() -> None:
    m = StopMatcher(["aaaa"])
    out, stopped = m.push("b" + "aaa")
    assert (out, stopped, m.held) == ("b", False, "aaa")
    out, _ = m.push("c" * 1000)
    assert out == "aaa" + "c" * 1000
    assert m.held == ""


_alpha = st.sampled_from("abc🙂")


@st.composite
def _case(draw: st.DrawFn) -> tuple[list[str], list[str]]:
    text = draw(st.text(_alpha, max_size=30))
    stops = draw(st.lists(st.text(_alpha, max_size=4), max_size=4))
    cuts = sorted(draw(st.sets(st.integers(0, len(text)), max_size=len(text) + 1)))
    bounds = [0, *cuts, len(text)]
    return [text[lo:hi] for lo, hi in zip(bounds, bounds[1:])], stops


@settings(max_examples=300, deadline=None)
@given(_case())
def test_matches_reference(case: tuple[list[str], list[str]]) -> None:
    pieces, stops = case
    text = "".join(pieces)
    expected, expected_stopped = reference(text, stops)

    m = StopMatcher(stops)
    emitted = ""
    stopped = False
    seen = ""
    for p in pieces:
        out, stopped = m.push(p)
        seen += p
        emitted += out
        # Streaming invariants: emitted text is a prefix of the final output,
        # never contains a stop string (nor, unless it is final, the start of
        # one), and held text is the rest of what was pushed.
        assert expected.startswith(emitted)
        for s in stops:
            if s:
                assert s not in emitted
        if stopped:
            break
        assert emitted + m.held == seen
        assert len(m.held) <= max((len(s) - 1 for s in stops if s), default=0)
    if not stopped:
        emitted += m.flush()
    assert stopped == expected_stopped
    assert emitted == expected

    nested = any(
        a != b and b and b in a[1:-1] for a in stops for b in stops
    )
    if not nested:
        assert emitted == reference_min_start(text, stops)


def test_the_stop_string_that_matched_is_named() -> None:
    m = StopMatcher(["END", "\n\n", "ENDING"])
    assert m.matched is None
    out, stopped = m.push("one\n")
    assert (out, stopped, m.matched) == ("one", False, None)
    out, stopped = m.push("\nEND")
    assert (out, stopped, m.matched) == ("", True, "\n\n")      # the earliest end wins
