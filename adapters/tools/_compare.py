"""Where two greedy token sequences part, and whether that is a near-tie or a bug (pure)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

__all__ = ["Divergence", "Status", "first_divergence", "status"]

#: A prompt's verdict: its batched tokens equal its solo ones, or part from them at a near-tie
#: (a logit margin below the threshold), or part for no such reason, or the request failed.
Status = Literal["equal", "near-tie", "DIVERGED", "failed"]


@dataclass(frozen=True, slots=True)
class Divergence:
    """The first index where the batched tokens differ from the solo ones, and both tokens there
    (None where that run had already ended)."""

    index: int
    solo: int | None
    batched: int | None


def first_divergence(
    solo: Sequence[int], batched: Sequence[int], *, prefix: bool = False
) -> Divergence | None:
    """None when ``batched`` equals ``solo`` (or, with ``prefix``, a cancelled run's tokens are a
    prefix of it); else where they part."""
    for i, (a, b) in enumerate(zip(solo, batched, strict=False)):
        if a != b:
            return Divergence(i, a, b)
    if len(batched) == len(solo) or (prefix and len(batched) < len(solo)):
        return None
    i = min(len(solo), len(batched))
    return Divergence(i, solo[i] if i < len(solo) else None, batched[i] if i < len(batched) else None)


def status(divergence: Divergence | None, margin: float | None, near_tie: float) -> Status:
    """``equal``; ``near-tie`` when the solo pass's logit margin between the two tokens is below
    ``near_tie``; else ``DIVERGED`` (also when no margin can be computed)."""
    if divergence is None:
        return "equal"
    if margin is not None and abs(margin) < near_tie:
        return "near-tie"
    return "DIVERGED"
