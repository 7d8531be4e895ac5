"""The scheduling policy, tested directly: it is a pure function."""

from __future__ import annotations

from dataclasses import dataclass

from hypothesis import given, settings
from hypothesis import strategies as st

from batcher._scheduler import plan


@dataclass
class R:
    name: str
    priority: int = 0
    arrival: float = 0.0
    deadline: float | None = None
    cost: int = 10


def names(rs: list[R]) -> list[str]:
    return [r.name for r in rs]


def test_fifo_up_to_free_slots() -> None:
    waiting = [R(str(i), arrival=i) for i in range(5)]
    admit, expired, rest = plan(waiting, free_slots=3, free_tokens=None, now=10, aging_s=1)
    assert names(admit) == ["0", "1", "2"] and expired == [] and names(rest) == ["3", "4"]


def test_token_budget_stops_at_the_first_that_does_not_fit() -> None:
    waiting = [R("a", cost=50), R("big", cost=80), R("c", cost=5)]
    admit, _, rest = plan(waiting, free_slots=10, free_tokens=100, now=0, aging_s=1)
    # "c" would fit, but skipping "big" for it could starve "big" forever.
    assert names(admit) == ["a"] and names(rest) == ["big", "c"]


def test_expired_requests_are_removed() -> None:
    waiting = [R("old", deadline=5.0), R("ok", deadline=50.0), R("none")]
    admit, expired, _ = plan(waiting, free_slots=10, free_tokens=None, now=6, aging_s=1)
    assert names(expired) == ["old"] and names(admit) == ["ok", "none"]


def test_higher_priority_first() -> None:
    waiting = [R("low", priority=0, arrival=9.9), R("high", priority=5, arrival=10)]
    admit, _, rest = plan(waiting, free_slots=1, free_tokens=None, now=10, aging_s=1)
    assert names(admit) == ["high"] and names(rest) == ["low"]


def test_aging_lifts_a_long_waiting_low_priority_request() -> None:
    waiting = [R("low", priority=0, arrival=0.0), R("high", priority=5, arrival=9.0)]
    # low waited 10 s (effective 10), high 1 s (effective 6)
    admit, _, _ = plan(waiting, free_slots=1, free_tokens=None, now=10, aging_s=1)
    assert names(admit) == ["low"]


@settings(max_examples=60, deadline=None)
@given(st.integers(1, 20), st.integers(1, 8), st.integers(1, 3))
def test_no_starvation_under_a_flood_of_high_priority_work(gap: int, slots: int, extra: int) -> None:
    """Fresh priority-`gap` work arrives faster than it is served, forever. Aging guarantees the
    priority-0 request is served before any high-priority request that arrived more than
    ``gap * aging_s`` after it: only a finite backlog can ever be ahead of it."""
    aging, step = 0.5, 0.1
    low = R("low", priority=0, arrival=0.0)
    waiting: list[R] = [low]
    served_before_low: list[R] = []
    now, n = 0.0, 0
    per_step = slots + extra
    # Highs that may precede it: those arriving within gap * aging (+ one step of rounding).
    limit_steps = ((gap * aging / step) + 2) * per_step / slots + 2
    for _ in range(int(limit_steps) + 1):
        waiting += [R(f"h{n + i}", priority=gap, arrival=now) for i in range(per_step)]
        n += per_step
        admit, _, waiting = plan(waiting, free_slots=slots, free_tokens=None, now=now, aging_s=aging)
        if low in admit:
            break
        served_before_low += admit
        now += step
    else:
        raise AssertionError("the low-priority request starved")
    assert all(h.arrival <= gap * aging + 1e-9 for h in served_before_low)
