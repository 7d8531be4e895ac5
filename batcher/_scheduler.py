"""The scheduling policy: which waiting requests join the running batch at the next step.

Pure and synchronous: given the waiting requests, the free slots and tokens, the time and the
tenants' fair-share clock, it decides; it never awaits, touches no queue and does no I/O, and the
only state it changes is the :class:`FairShare` it is given, so it is tested directly.

The policy, in order:
1. A waiting request whose deadline has passed is *expired* (the engine fails it).
2. **Tenants share by weight** (start-time fair queuing): each admission charges its tenant
   ``cost / weight`` of virtual time, and the next slot goes to the tenant whose next request
   would start earliest in virtual time. A tenant that was idle starts at the clock: it gets its
   share at once but banks no credit for the time it sent nothing. One tenant's flood therefore
   delays another tenant's requests by about one request each, not by the whole flood.
3. **Within a tenant**, requests rank by effective priority, ``priority + waited_s /
   priority_aging_s`` (higher first; equal ranks keep arrival order). Aging bounds starvation: a
   request that waited ``(p_high - p_low) * priority_aging_s`` seconds ranks with fresh
   high-priority work. Priority orders a tenant's own requests; it cannot buy a tenant more than
   its weight.
4. Requests are admitted in that order while slots (``max_batch_size``), KV tokens
   (prompt + max_tokens, reserved up front) and the step's prefill budget remain. The prefill
   budget counts only the prompt tokens a newcomer will compute (``prefill``: its prompt less the
   prefix the backend expects to serve from its cache), so newcomers with a cached prefix fit
   more per step, and a long cold prompt waits for a step of its own rather than stall every
   running row behind its prefill; the first newcomer of a step always fits it (else a prompt
   longer than the budget would never run). The first request that does not fit stops
   admission: skipping it for smaller ones would let a stream of small requests starve a large one.
"""

from __future__ import annotations

import heapq
from collections.abc import Iterator, Mapping, Sequence
from typing import Protocol, TypeVar

__all__ = ["FairShare", "Schedulable", "ahead_of", "plan"]


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
    @property
    def prefill(self) -> int: ...
    @property
    def tenant(self) -> str: ...


R = TypeVar("R", bound=Schedulable)


class FairShare:
    """The tenants' virtual clock (start-time fair queuing; see module doc).

    ``clock`` is the virtual start time of the last admission; ``finish[t]`` is when tenant ``t``'s
    charged work ends in virtual time. A tenant absent from ``finish`` (or behind the clock) starts
    at the clock, so entries behind it are forgotten: the map holds only tenants ahead of it.
    """

    __slots__ = ("clock", "finish", "weights")

    def __init__(self, weights: Mapping[str, float]) -> None:
        self.weights = weights
        self.clock = 0.0
        self.finish: dict[str, float] = {}

    def start(self, tenant: str) -> float:
        """The virtual time at which ``tenant``'s next request would start."""
        finish = self.finish.get(tenant, 0.0)
        return finish if finish > self.clock else self.clock

    def charge(self, tenant: str, cost: int) -> None:
        """``tenant`` was admitted work of ``cost`` tokens."""
        start = self.start(tenant)
        self.clock = start
        self.finish[tenant] = start + cost / self.weights.get(tenant, 1.0)

    def settle(self, backlog: bool) -> None:
        """Bound the map after a plan. With no ``backlog`` (nothing left waiting) nobody is
        delayed by anybody, so every debt is forgiven. Else tenants behind the clock are dropped
        (they start at it anyway); past 1,024 tenants ahead of it, the clock jumps to their
        median, a bounded loss of precision against a flood of tenant names."""
        if not backlog:
            self.finish.clear()
            self.clock = 0.0
        elif len(self.finish) > 64:
            if len(self.finish) > 1024:
                self.clock = sorted(self.finish.values())[len(self.finish) // 2]
            clock = self.clock
            self.finish = {t: f for t, f in self.finish.items() if f > clock}


def ahead_of(tenant: str, queued: Mapping[str, int], weights: Mapping[str, float]) -> float:
    """About how many queued requests run before a newcomer of ``tenant``, by fair share: from
    each tenant ``u``, as many as its weight gets while ``tenant``'s own queue and the newcomer
    go, ``min(queued[u], (queued[tenant] + 1) * w(u) / w(tenant))``."""
    mine = queued.get(tenant, 0) + 1
    w = weights.get(tenant, 1.0)
    return sum(min(n, mine * weights.get(u, 1.0) / w) for u, n in queued.items() if u != tenant) + mine - 1


def plan(
    waiting: Sequence[R],
    *,
    free_slots: int,
    free_tokens: int | None,
    now: float,
    aging_s: float,
    shares: FairShare | None = None,
    prefill_tokens: int | None = None,
) -> tuple[list[R], list[R], list[R]]:
    """Return ``(admit, expired, rest)`` for the waiting requests (see module doc).

    ``free_tokens`` is None when there is no token budget, ``prefill_tokens`` when there is no
    per-step prefill budget. ``rest`` keeps the waiting requests in arrival order. Without
    ``shares`` every request counts as one tenant's.
    """
    live: list[R] = []
    expired: list[R] = []
    for r in waiting:
        (expired if r.deadline is not None and r.deadline <= now else live).append(r)
    if free_slots <= 0 or not live:
        return [], expired, live
    first = live[0].tenant
    if shares is None or all(r.tenant == first for r in live):
        ordered = iter(_rank(live, now, aging_s))
    else:
        ordered = _fair_order(live, now, aging_s, shares)
    admit: list[R] = []
    budget, prefill = free_tokens, prefill_tokens
    for r in ordered:
        if len(admit) == free_slots:
            break
        if budget is not None:
            if r.cost > budget:
                break
            budget -= r.cost
        if prefill is not None:
            if admit and r.prefill > prefill:
                break
            prefill -= r.prefill
        admit.append(r)
        if shares is not None:
            shares.charge(r.tenant, r.cost)
    if shares is not None:
        shares.settle(backlog=len(admit) < len(live))
    if not admit:
        return [], expired, live
    chosen = set(map(id, admit))
    return admit, expired, [r for r in live if id(r) not in chosen]


def _rank(live: list[R], now: float, aging_s: float) -> list[R]:
    first = live[0].priority
    if all(r.priority == first for r in live):
        return live  # equal priorities age alike: arrival order is the rank order
    return sorted(live, key=lambda r: -(r.priority + (now - r.arrival) / aging_s))


def _fair_order(live: list[R], now: float, aging_s: float, shares: FairShare) -> Iterator[R]:
    """The requests in fair-share order: each next one from the tenant that starts earliest in
    virtual time (ties: the tenant whose first request came first). Lazy: the caller charges each
    request it takes before asking for the next."""
    by_tenant: dict[str, list[R]] = {}
    for r in live:
        by_tenant.setdefault(r.tenant, []).append(r)
    queues = {t: iter(_rank(rs, now, aging_s)) for t, rs in by_tenant.items()}
    heads = {t: next(q) for t, q in queues.items()}
    heap = [(shares.start(t), h.arrival, t) for t, h in heads.items()]
    heapq.heapify(heap)
    while heap:
        _, _, tenant = heapq.heappop(heap)
        yield heads[tenant]
        following = next(queues[tenant], None)
        if following is not None:
            heads[tenant] = following
            heapq.heappush(heap, (shares.start(tenant), following.arrival, tenant))
