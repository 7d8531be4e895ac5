"""The scheduling policy: which waiting requests join the running batch at the next step.

Pure and synchronous: given the waiting requests, the free slots and tokens, and the time, it
decides; it never awaits, touches no queue and does no I/O, so it is tested directly.

The policy, in order:
1. A waiting request whose deadline has passed is *expired* (the engine fails it).
2. The rest are ranked by effective priority, ``priority + waited_s / priority_aging_s`` (higher
   first; equal ranks keep arrival order). Aging bounds starvation: a request that waited
   ``(p_high - p_low) * priority_aging_s`` seconds ranks with fresh high-priority work.
3. Requests are admitted in rank order while slots (``max_batch_size``) and KV tokens
   (prompt + max_tokens, reserved up front) remain. The first request that does not fit stops
   admission: skipping it for smaller ones would let a stream of small requests starve a large one.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol, TypeVar

__all__ = ["Schedulable", "plan"]


class Schedulable(Protocol):
    """What the scheduler reads of a waiting request."""

    @property
    def priority(self) -> int: ...
    @property
    def arrival(self) -> float: ...
    @property
    def deadline(self) -> float | None: ...
    @property
    def cost(self) -> int: ...


R = TypeVar("R", bound=Schedulable)


def plan(
    waiting: Sequence[R],
    *,
    free_slots: int,
    free_tokens: int | None,
    now: float,
    aging_s: float,
) -> tuple[list[R], list[R], list[R]]:
    """Return ``(admit, expired, rest)`` for the waiting requests (see module doc).

    ``free_tokens`` is None when there is no token budget. ``rest`` keeps the waiting requests in
    arrival order.
    """
    live: list[R] = []
    expired: list[R] = []
    for r in waiting:
        (expired if r.deadline is not None and r.deadline <= now else live).append(r)
    if free_slots <= 0 or not live:
        return [], expired, live
    ranked = _rank(live, now, aging_s)
    admit: list[R] = []
    budget = free_tokens
    for r in ranked:
        if len(admit) == free_slots:
            break
        if budget is not None:
            if r.cost > budget:
                break
            budget -= r.cost
        admit.append(r)
    if not admit:
        return [], expired, live
    chosen = set(map(id, admit))
    return admit, expired, [r for r in live if id(r) not in chosen]


def _rank(live: list[R], now: float, aging_s: float) -> list[R]:
    first = live[0].priority
    if all(r.priority == first for r in live):
        return live  # equal priorities age alike: arrival order is the rank order
    return sorted(live, key=lambda r: -(r.priority + (now - r.arrival) / aging_s))
