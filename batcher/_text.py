"""Stop strings on a stream of text deltas: torch-free, shared by every backend.

A stop string must never leak into the stream, even when it arrives split across tokens, so the
tail of the text that could still become a stop string is held back until it either completes one
(the stream ends just before it) or can no longer do so (it is released).
"""

from __future__ import annotations

from collections.abc import Sequence

__all__ = ["StopMatcher"]


class StopMatcher:
    """Feed text deltas with :meth:`feed`; get back what is safe to emit and whether a stop hit."""

    __slots__ = ("_held", "_max_len", "_stops")

    def __init__(self, stops: Sequence[str]) -> None:
        self._stops = tuple(stops)
        self._held = ""
        self._max_len = max((len(s) for s in self._stops), default=0)

    def feed(self, delta: str) -> tuple[str, bool]:
        """Return ``(text to emit, stopped)``. After ``stopped`` is true, feed no more."""
        if not self._stops:
            return delta, False
        text = self._held + delta
        first = -1
        for s in self._stops:
            i = text.find(s)
            if i != -1 and (first == -1 or i < first):
                first = i
        if first != -1:
            self._held = ""
            return text[:first], True
        keep = self._partial_suffix(text)
        self._held = text[len(text) - keep :] if keep else ""
        return text[: len(text) - keep], False

    def flush(self) -> str:
        """The held-back text, at the end of a stream that did not stop on a stop string."""
        held, self._held = self._held, ""
        return held

    def _partial_suffix(self, text: str) -> int:
        """Length of the longest suffix of ``text`` that is a proper prefix of some stop string."""
        for n in range(min(self._max_len - 1, len(text)), 0, -1):
            tail = text[-n:]
            if any(s.startswith(tail) for s in self._stops):
                return n
        return 0
