"""Stop strings never leak into a stream, however the text is split into deltas."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from batcher.backend import StopMatcher


def run(deltas: list[str], stops: list[str]) -> tuple[str, bool]:
    m, out = StopMatcher(stops), []
    for d in deltas:
        text, stopped = m.feed(d)
        out.append(text)
        if stopped:
            return "".join(out), True
    return "".join(out) + m.flush(), False


def test_split_stop_string_is_held_back_then_cut() -> None:
    assert run(["Hello, wor", "ld! EN", "D more"], ["END"]) == ("Hello, world! ", True)


def test_partial_match_released_when_it_cannot_complete() -> None:
    m = StopMatcher(["END"])
    assert m.feed("the E") == ("the ", False)
    assert m.feed("nd") == ("End", False)


@given(
    st.lists(st.text(alphabet="abcXY", max_size=6), max_size=12),
    st.lists(st.text(alphabet="abcXY", min_size=1, max_size=4), min_size=1, max_size=3),
)
def test_output_is_the_text_before_the_first_stop(deltas: list[str], stops: list[str]) -> None:
    full = "".join(deltas)
    hits = [i for s in stops if (i := full.find(s)) != -1]
    out, stopped = run(deltas, stops)
    if hits:
        assert stopped and out == full[: min(hits)]
    else:
        assert not stopped and out == full
