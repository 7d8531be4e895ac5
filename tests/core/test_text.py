"""Stop strings never leak into a stream, however the text is split into deltas."""

from __future__ import annotations

from hypothesis import example, given
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


@example(["YX", "Y"], ["X", "YXY"])
@given(
    st.lists(st.text(alphabet="abcXY", max_size=6), max_size=12),
    st.lists(st.text(alphabet="abcXY", min_size=1, max_size=4), min_size=1, max_size=3),
)
def test_output_is_the_text_before_the_first_stop(deltas: list[str], stops: list[str]) -> None:
    # Generation ends with the first delta after which the text holds a stop string (a model stops
    # generating there: later deltas never exist); the output is the text before the earliest
    # stop in that text. (deltas "YX", "Y" with stops "X", "YXY": "Y", not "" — "YXY" never happens.)
    text, hits = "", []
    for d in deltas:
        text += d
        hits = [i for s in stops if (i := text.find(s)) != -1]
        if hits:
            break
    out, stopped = run(deltas, stops)
    if hits:
        assert stopped and out == text[: min(hits)]
    else:
        assert not stopped and out == text
