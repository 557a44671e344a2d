from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from modelyard.local.detokenize import Detokenizer


def test_ascii_passthrough() -> None:
    d = Detokenizer()
    assert d.push(b"Hello") == "Hello"
    assert d.push(b", world") == ", world"
    assert d.flush() == ""
    assert d.text == "Hello, world"


def test_emoji_split_across_four_pieces() -> None:
    data = "🙂".encode()
    assert len(data) == 4
    d = Detokenizer()
    assert [d.push(data[i : i + 1]) for i in range(3)] == ["", "", ""]
    assert d.text == ""
    assert d.push(data[3:]) == "🙂"
    assert d.flush() == ""
    assert d.text == "🙂"


def test_partial_char_released_with_following_text() -> None:
    data = "é!".encode()
    d = Detokenizer()
    assert d.push(b"a" + data[:1]) == "a"
    assert d.push(data[1:]) == "é!"


def test_invalid_byte_becomes_replacement_char() -> None:
    d = Detokenizer()
    assert d.push(b"a\xffb") == "a\ufffdb"
    assert d.push(b"\x80") == "\ufffd"  # lone continuation byte
    assert d.flush() == ""
    assert d.text == "a\ufffdb\ufffd"


def test_incomplete_bytes_at_end_become_replacement_char() -> None:
    d = Detokenizer()
    assert d.push(b"x" + "中".encode()[:2]) == "x"
    assert d.flush() == "\ufffd"
    assert d.text == "x\ufffd"


def test_interrupted_sequence_does_not_swallow_next_char() -> None:
    d = Detokenizer()
    out = d.push("中".encode()[:2]) + d.push(b"A") + d.flush()
    assert out == "\ufffdA"


def test_empty_pieces() -> None:
    d = Detokenizer()
    assert d.push(b"") == ""
    assert d.flush() == ""
    assert d.text == ""


# Text without surrogates (not encodable) and without U+FFFD (so any U+FFFD in
# the output would be a decoding bug), biased toward multi-byte characters.
_chars = st.one_of(
    st.characters(blacklist_categories=("Cs",), blacklist_characters="\ufffd"),
    st.sampled_from("é中文日本語한국어🙂😀🚀👍🏽𝄞"),
)


@st.composite
def _text_and_cuts(draw: st.DrawFn) -> tuple[str, list[int]]:
    text = draw(st.text(_chars, max_size=40))
    n = len(text.encode())
    cuts = sorted(draw(st.sets(st.integers(0, n), max_size=n + 1)))
    return text, cuts


@settings(max_examples=300, deadline=None)
@given(_text_and_cuts())
def test_random_byte_split_roundtrips(case: tuple[str, list[int]]) -> None:
    text, cuts = case
    data = text.encode()
    bounds = [0, *cuts, len(data)]
    # Byte offsets at which a character ends: text must be emitted as soon as
    # a character is complete, and never earlier.
    char_ends = {0}
    pos = 0
    for ch in text:
        pos += len(ch.encode())
        char_ends.add(pos)

    d = Detokenizer()
    emitted = ""
    for lo, hi in zip(bounds, bounds[1:]):
        out = d.push(data[lo:hi])
        assert isinstance(out, str)
        out.encode("utf-8")  # no lone surrogates
        assert "\ufffd" not in out
        emitted += out
        complete = max(e for e in char_ends if e <= hi)
        assert emitted == data[:complete].decode()
    emitted += d.flush()
    assert emitted == text
    assert d.text == text


@settings(max_examples=200, deadline=None)
@given(st.lists(st.binary(max_size=6), max_size=10))
def test_arbitrary_bytes_never_raise(pieces: list[bytes]) -> None:
    d = Detokenizer()
    out = "".join(d.push(p) for p in pieces) + d.flush()
    assert out == b"".join(pieces).decode("utf-8", errors="replace")
    assert d.text == out


# -- align_to_text: echoed prompt tokens against the text they came from ---------------------

def test_align_gives_written_control_tokens_their_text_and_added_ones_none() -> None:
    """ids: an added BOS (0), a control token written in the text (1, "<s>"), then "hi", and a
    byte token pair splitting "é". Control tokens render as empty pieces."""
    from modelyard.local.detokenize import align_to_text
    pieces = {0: b"", 1: b"", 2: b"hi", 3: b"\xc3", 4: b"\xa9"}
    vocab = {"<s>": [1], "hi": [2]}
    text = "<s>hié"
    got, offsets = align_to_text(text, [0, 1, 2, 3, 4], pieces.__getitem__, lambda s: vocab.get(s, [9, 9]))
    assert got == [b"", b"<s>", b"hi", b"\xc3", b"\xa9"]
    assert offsets == [0, 0, 3, 5, 5]
    ends = offsets[1:] + [len(text)]
    assert [text[a:b] for a, b in zip(offsets[:3], ends[:3])] == ["", "<s>", "hi"]
