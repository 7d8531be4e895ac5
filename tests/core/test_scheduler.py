"""The scheduling policy, tested directly: it is a pure function."""

from __future__ import annotations

from dataclasses import dataclass

from hypothesis import given, settings
from hypothesis import strategies as st

from batcher._scheduler import FairShare, plan


@dataclass
class R:
    name: str
    priority: int = 0
    arrival: float = 0.0
    deadline: float | None = None
    cost: int = 10
    tenant: str = "default"
    prefill: int = 10


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


def test_prefill_budget_counts_only_uncached_tokens() -> None:
    # Four 500-token prompts: cold, only the first fits a 600-token step; with 480 tokens of each
    # cached (20 to compute), all four do.
    cold = [R(str(i), cost=600, prefill=500) for i in range(4)]
    warm = [R(str(i), cost=600, prefill=20) for i in range(4)]
    admit, _, rest = plan(cold, free_slots=8, free_tokens=None, now=0, aging_s=1, prefill_tokens=600)
    assert names(admit) == ["0"] and names(rest) == ["1", "2", "3"]
    admit, _, rest = plan(warm, free_slots=8, free_tokens=None, now=0, aging_s=1, prefill_tokens=600)
    assert names(admit) == ["0", "1", "2", "3"] and rest == []


def test_prefill_budget_always_admits_a_steps_first_newcomer_and_never_skips() -> None:
    waiting = [R("huge", prefill=5000), R("small", prefill=1)]
    admit, _, _ = plan(waiting, free_slots=8, free_tokens=None, now=0, aging_s=1, prefill_tokens=100)
    assert names(admit) == ["huge"]  # alone: else a prompt over the budget would never run
    waiting = [R("a", prefill=60), R("b", prefill=60), R("c", prefill=1)]
    admit, _, rest = plan(waiting, free_slots=8, free_tokens=None, now=0, aging_s=1, prefill_tokens=100)
    assert names(admit) == ["a"] and names(rest) == ["b", "c"]  # "c" fits, but must not jump "b"


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


def test_a_newcomer_tenant_is_interleaved_with_a_flood_not_queued_behind_it() -> None:
    shares = FairShare({})
    flood = [R(f"a{i}", arrival=i, tenant="A") for i in range(100)]
    plan(flood, free_slots=10, free_tokens=None, now=100, aging_s=1, shares=shares)  # A ran first
    late = [R(f"b{i}", arrival=200 + i, tenant="B") for i in range(3)]
    admit, _, _ = plan(
        [*flood[10:], *late], free_slots=6, free_tokens=None, now=300, aging_s=1, shares=shares
    )
    # B starts at the clock, A is charged for what it already ran: B first, then turns
    assert names(admit) == ["b0", "a10", "b1", "a11", "b2", "a12"]


def test_weights_share_the_slots_under_saturation() -> None:
    shares = FairShare({"gold": 3.0})
    served = {"gold": 0, "free": 0}
    waiting = [R(f"{t}{i}", arrival=i, tenant=t) for i in range(400) for t in ("gold", "free")]
    for _ in range(50):
        admit, _, waiting = plan(waiting, free_slots=4, free_tokens=None, now=0, aging_s=1, shares=shares)
        for r in admit:
            served[r.tenant] += r.cost
    assert served["gold"] == 3 * served["free"]


def test_an_idle_tenant_banks_no_credit() -> None:
    shares = FairShare({})
    plan([R("b0", tenant="B")], free_slots=1, free_tokens=None, now=0, aging_s=1, shares=shares)
    for i in range(20):  # A runs alone for a long time
        plan([R(f"a{i}", tenant="A")], free_slots=1, free_tokens=None, now=0, aging_s=1, shares=shares)
    waiting = [R(f"a{i}", arrival=i, tenant="A") for i in range(20, 30)]
    waiting += [R(f"b{i}", arrival=30 + i, tenant="B") for i in range(1, 10)]
    admit, _, _ = plan(waiting, free_slots=6, free_tokens=None, now=40, aging_s=1, shares=shares)
    assert sorted(r.tenant for r in admit) == ["A"] * 3 + ["B"] * 3  # turns, not B x 6


def test_priority_and_aging_order_a_tenants_own_requests() -> None:
    shares = FairShare({})
    waiting = [
        R("a-low", priority=0, arrival=9, tenant="A"),
        R("a-high", priority=5, arrival=9.5, tenant="A"),
        R("b-low", priority=0, arrival=0, tenant="B"),
        R("b-high", priority=5, arrival=9.9, tenant="B"),
    ]
    admit, _, _ = plan(waiting, free_slots=4, free_tokens=None, now=10, aging_s=1, shares=shares)
    # B's low waited 10 s (effective 10 > 5) and goes first; A's high outranks A's low; after a
    # turn each, the tenants tie in virtual time and the earlier arrival (a-low) goes first
    assert names(admit) == ["b-low", "a-high", "a-low", "b-high"]


def test_the_fair_share_stays_bounded() -> None:
    shares = FairShare({})
    backlog = [R("waiting", tenant="w")] * 2  # a backlog all along: debts are kept, but bounded
    for i in range(3000):
        waiting = [R(f"t{i}", tenant=f"t{i}"), *backlog]
        plan(waiting, free_slots=1, free_tokens=None, now=0, aging_s=1, shares=shares)
        assert len(shares.finish) <= 1025
    plan([R("x", tenant="x")], free_slots=1, free_tokens=None, now=0, aging_s=1, shares=shares)
    assert shares.finish == {}, "with nothing left waiting, every debt is forgiven"
