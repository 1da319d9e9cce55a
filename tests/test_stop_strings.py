"""StopStringMatcher: streamed output equals the full text cut at the first stop string, and never leaks."""
from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tessera.tokenizer.stop_strings import StopStringMatcher


def reference(text: str, stop: list[str], include: bool) -> tuple[str, str | None]:
    """The earliest occurrence of any stop string (the shortest of those starting there)."""
    found = [(text.find(s), len(s), s) for s in stop if s in text]
    if not found:
        return text, None
    start, _, s = min(found)
    return text[:start] + (s if include else ""), s


def run(deltas: list[str], stop: list[str], include: bool) -> tuple[list[str], str | None]:
    matcher = StopStringMatcher(stop, include)
    emitted, matched = [], None
    for delta in deltas:
        text, hit = matcher.push(delta)
        emitted.append(text)
        if hit is not None:
            assert matched is None
            matched = hit
    emitted.append(matcher.flush())
    assert matcher.matched == matched or matched is None  # a match found at flush shows in .matched
    return emitted, matcher.matched


@settings(max_examples=500, deadline=None)
@given(deltas=st.lists(st.text(alphabet="abc", max_size=5), max_size=12),
       stop=st.lists(st.text(alphabet="abc", min_size=1, max_size=4), max_size=3),
       include=st.booleans())
def test_stream_equals_reference(deltas, stop, include):
    emitted, matched = run(deltas, stop, include)
    expected, expected_stop = reference("".join(deltas), stop, include)
    assert "".join(emitted) == expected
    assert matched == expected_stop


@settings(max_examples=200, deadline=None)
@given(deltas=st.lists(st.text(alphabet="abc", max_size=5), max_size=12),
       stop=st.lists(st.text(alphabet="abc", min_size=1, max_size=4), min_size=1, max_size=3))
def test_nothing_after_a_partial_or_full_match_leaks_early(deltas, stop):
    # At every step the text emitted so far is a prefix of the final answer, whatever comes next.
    matcher = StopStringMatcher(stop, include_stop_str_in_output=False)
    expected, _ = reference("".join(deltas), stop, include=False)
    so_far = ""
    for delta in deltas:
        so_far += matcher.push(delta)[0]
        assert expected.startswith(so_far)


def test_examples():
    assert run(["Hello wor", "ld. Done"], ["world"], False) == (["Hello ", "", ""], "world")
    assert run(["Hello wor", "ld. Done"], ["world"], True) == (["Hello ", "world", ""], "world")
    assert run(["Answer: 42</ans"], ["</answer>"], False) == (["Answer: 42", "</ans"], None)  # held, then flushed
    assert run(["ab", "cd"], ["abcd", "bc"], False) == (["", "", ""], "abcd")  # starts earlier, wins
    assert run(["ab", "ce"], ["abcd", "bc"], False) == (["", "a", ""], "bc")
    assert run(["x\n\nUser:", " hi"], ["\nUser:", "\n\n"], True) == (["x\n\n", "", ""], "\n\n")
    assert run(["ab"], ["b", "aba"], False) == (["", "a"], "b")  # "aba" could still come, until the end
    assert run(["no stops here"], [], False) == (["no stops here", ""], None)


def test_after_a_match_everything_is_dropped():
    matcher = StopStringMatcher(["STOP"])
    assert matcher.push("aSTOPb") == ("a", "STOP")
    assert matcher.push("more") == ("", None)
    assert matcher.flush() == ""
    assert matcher.matched == "STOP"


def test_empty_stop_string_is_rejected_by_index():
    with pytest.raises(ValueError, match=r"stop\[1\]"):
        StopStringMatcher(["ok", ""])


# --- engine messages that carry several tokens (a lagging stream) ---------------------------------------------

@settings(max_examples=100, deadline=None)
@given(data=st.data())
def test_tokens_merged_into_fewer_messages_give_the_same_text_and_cut(data):
    """The tokenizer service's per-message step (text_of_tokens): however the engine groups tokens into
    messages, the text is the same, and a stop string ends the kept tokens at the token that completed it."""
    from tessera.tokenizer.detokenizer import IncrementalDetokenizer
    from tessera.tokenizer.service import text_of_tokens
    from tiny_tokenizers import CORPUS, tessera_tokenizer

    tokenizer = tessera_tokenizer("llama3")
    ids = tokenizer.encode(" ".join(CORPUS), add_special_tokens=False)[:40]
    stop = data.draw(st.lists(st.sampled_from(["the", "e ", "s", "xyz", "\n"]), max_size=2))

    def run_messages(sizes):
        detokenizer, stops = IncrementalDetokenizer(tokenizer, []), StopStringMatcher(stop)
        text, kept, start = "", [], 0
        while start < len(ids):
            size = sizes[len(kept) % len(sizes)]
            chunk = ids[start : start + size]
            start += size
            piece, count, matched = text_of_tokens(chunk, start >= len(ids), detokenizer, stops)
            text += piece
            kept.append(chunk[:count])
            if matched is not None:
                break
        return text, [t for chunk in kept for t in chunk], matched

    one_by_one = run_messages([1])
    merged = run_messages(data.draw(st.lists(st.integers(1, 7), min_size=1, max_size=4)))
    assert merged == one_by_one
    text, kept, matched = one_by_one
    expected_text, expected_stop = reference(tokenizer.decode(ids, True), stop, False)
    assert (text, matched) == (expected_text, expected_stop)
    if matched is not None:  # the last kept token completed the stop string; one token fewer does not reach it
        assert matched in tokenizer.decode(kept, True) and matched not in tokenizer.decode(kept[:-1], True)
