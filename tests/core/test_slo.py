"""SLO-aware admission: the step-cost model the engine learns, Retry-After from the real drain
time, refusal at once of a request that would miss its time-to-first-token objective, and a batch
window that stays shut at low load. On the shipped FakeBackend, whose step time is known."""

from __future__ import annotations

import asyncio
import random

import pytest

from batcher import BatchConfig, Batcher, Overloaded
from batcher._cost import StepCost, steps_until_slot
from batcher.testing import FakeBackend


def test_the_cost_model_recovers_a_known_step_cost() -> None:
    rng = random.Random(7)
    cost = StepCost()
    assert not cost.ready
    for _ in range(200):
        rows, new = rng.randint(1, 64), rng.choice([0, 0, 0, rng.randint(1, 500)])
        cost.observe(rows, new, (0.010 + 0.0005 * rows + 0.00002 * new) * rng.uniform(0.97, 1.03))
    a, b, c = cost.coefficients
    assert a == pytest.approx(0.010, rel=0.1) and b == pytest.approx(0.0005, rel=0.1)
    assert c == pytest.approx(0.00002, rel=0.15)
    assert cost.predict(32, 100) == pytest.approx(0.010 + 0.016 + 0.002, rel=0.05)


def test_the_cost_model_predicts_where_it_has_seen_steps_even_if_rows_never_varied() -> None:
    cost = StepCost()
    for _ in range(20):
        cost.observe(8, 0, 0.004)
    assert cost.predict(8, 0) == pytest.approx(0.004, rel=0.01)


def test_waiting_for_a_fuller_batch_only_pays_when_arrivals_are_fast_and_steps_costly() -> None:
    cost = StepCost()
    for rows in range(1, 33):
        cost.observe(rows, 0, 0.020 + 0.0001 * rows)  # a heavy per-step cost
    assert cost.worth_waiting(1, arrivals_per_s=500, wait_s=0.01)
    assert not cost.worth_waiting(1, arrivals_per_s=5, wait_s=0.01)  # low load: start now
    assert not cost.worth_waiting(1, arrivals_per_s=0, wait_s=0.01)
    cheap = StepCost()
    for rows in range(1, 33):
        cheap.observe(rows, 0, 0.0001 + 0.002 * rows)  # cost per row only: batching buys nothing
    assert not cheap.worth_waiting(1, arrivals_per_s=500, wait_s=0.01)


def test_steps_until_slot() -> None:
    assert steps_until_slot(0, [5, 9], rows=2, mean_tokens=10) == 0
    assert steps_until_slot(1, [9, 5], rows=2, mean_tokens=10) == 5
    assert steps_until_slot(2, [9, 5], rows=2, mean_tokens=10) == 9
    assert steps_until_slot(4, [9, 5], rows=2, mean_tokens=10) == 9 + 2 / 2 * 10


async def wait_until(cond, timeout: float = 20.0) -> None:  # type: ignore[no-untyped-def]
    async with asyncio.timeout(timeout):
        while not cond():
            await asyncio.sleep(0.002)


async def refused_retry_after(step_s: float) -> tuple[float, float]:
    """Fill a fake backend (8 rows a step, ``step_s`` a step) and its queue; return the refused
    request's retry_after and the known time to drain what is left."""
    fb = FakeBackend(step_time_s=step_s)
    rows, queue, tokens = 8, 40, 50
    b = Batcher(fb, BatchConfig(max_batch_size=rows, max_queue=queue, batch_window_s=0.0))
    async with b:
        tasks = [asyncio.create_task(b.generate(f"r {i}", max_tokens=tokens)) for i in range(rows)]
        await wait_until(lambda: b.stats().running == rows)
        tasks += [asyncio.create_task(b.generate(f"q {i}", max_tokens=tokens)) for i in range(queue)]
        await wait_until(lambda: b.stats().steps >= 12 and b.queue_depth == queue)
        with pytest.raises(Overloaded) as info:
            await b.generate("one too many", max_tokens=tokens)
        left = (rows + queue) * tokens - b.stats().generated_tokens
        await b.aclose(timeout=0)
    await asyncio.gather(*tasks, return_exceptions=True)
    return info.value.retry_after, left / (rows / step_s)  # work ÷ the known drain rate


async def test_retry_after_follows_the_known_drain_rate() -> None:
    for step_s in (0.002, 0.02):  # ten times the drain time: no constant fits both
        retry, known = await refused_retry_after(step_s)
        print(f"step {step_s * 1000:g} ms: retry_after {retry:.3f} s, known drain time {known:.3f} s")
        assert known / 2 <= retry <= known * 2


async def test_retry_after_is_jittered_so_refused_clients_spread_out() -> None:
    fb = FakeBackend(step_time_s=0.005)
    async with Batcher(fb, BatchConfig(max_batch_size=4, max_queue=8, batch_window_s=0.0)) as b:
        tasks = [asyncio.create_task(b.generate(f"r {i}", max_tokens=200)) for i in range(4)]
        await wait_until(lambda: b.stats().running == 4)
        tasks += [asyncio.create_task(b.generate(f"q {i}", max_tokens=200)) for i in range(8)]
        await wait_until(lambda: b.stats().steps >= 10 and b.queue_depth == 8)
        delays = [b.retry_after() for _ in range(50)]
        await b.aclose(timeout=0)
    await asyncio.gather(*tasks, return_exceptions=True)
    assert max(delays) > 1.2 * min(delays), "refused clients would all come back together"


async def learn(b: Batcher, n: int = 10) -> None:
    """Run ``n`` lone requests, so the engine's cost model has steps to learn from."""
    for i in range(n):
        await b.generate(f"warm {i}", max_tokens=2)


async def test_a_request_that_would_miss_the_ttft_objective_is_refused_at_once() -> None:
    fb = FakeBackend(step_time_s=0.005)
    config = BatchConfig(max_batch_size=4, batch_window_s=0.0, ttft_slo_s=0.1)
    async with Batcher(fb, config) as b:
        await learn(b)
        loop = asyncio.get_running_loop()
        # low load: lone requests are never refused
        for i in range(5):
            await b.generate(f"lone {i}", max_tokens=5)
        # a full batch of short requests: a newcomer waits ~5 steps (25 ms): admitted
        short = [asyncio.create_task(b.generate(f"s {i}", max_tokens=5)) for i in range(4)]
        await wait_until(lambda: b.stats().running == 4)
        await b.generate("fits", max_tokens=5)
        await asyncio.gather(*short)
        # a full batch of long requests: ~100 steps (0.5 s) before a slot frees: refused at once
        long = [asyncio.create_task(b.generate(f"l {i}", max_tokens=100)) for i in range(4)]
        await wait_until(lambda: b.stats().running == 4)
        t0 = loop.time()
        with pytest.raises(Overloaded, match=r"ttft_slo_s=0\.1") as info:
            await b.generate("late", max_tokens=5)
        assert loop.time() - t0 < 0.05, "refused at once, not queued to time out"
        assert info.value.retry_after > 0.1
        await asyncio.gather(*long)
        assert b.stats().outcomes["overloaded"] == 1


async def test_the_batch_window_stays_shut_at_low_load() -> None:
    fb = FakeBackend(step_time_s=0.001)
    async with Batcher(fb, BatchConfig(batch_window_s=0.2)) as b:
        await learn(b)  # the first steps use the configured window: nothing is learned yet
        loop = asyncio.get_running_loop()
        t0 = loop.time()
        for i in range(5):
            await b.generate(f"lone {i}", max_tokens=2)
        assert (loop.time() - t0) / 5 < 0.05, "a lone request waited for a batch that never came"
