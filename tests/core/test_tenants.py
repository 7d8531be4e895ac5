"""Tenants share the batch by weight: a flood from one does not queue another behind it, weights
split the tokens under saturation, each tenant has its own queue limit, and the per-tenant
metrics stay bounded whatever tenant names arrive. On the shipped FakeBackend."""

from __future__ import annotations

import asyncio
import statistics

import pytest

from batcher import BatchConfig, Batcher, InvalidRequest, Overloaded
from batcher._stats import OTHER_TENANTS, TenantTally
from batcher.testing import FakeBackend


async def timed(b: Batcher, prompt: str, tenant: str, max_tokens: int) -> float:
    """Seconds from submission to the whole completion."""
    loop = asyncio.get_running_loop()
    t0 = loop.time()
    await b.generate(prompt, max_tokens=max_tokens, tenant=tenant)
    return loop.time() - t0


async def wait_until(cond, timeout: float = 20.0) -> None:  # type: ignore[no-untyped-def]
    async with asyncio.timeout(timeout):
        while not cond():
            await asyncio.sleep(0.002)


@pytest.mark.timed
@pytest.mark.usefixtures("frozen_heap")
async def test_a_tenant_after_a_flood_of_another_finishes_in_a_quarter_of_its_time() -> None:
    fb = FakeBackend(step_time_s=0.002, step_time_per_seq_s=0.0001)
    config = BatchConfig(max_batch_size=16, max_queue=400, batch_window_s=0.0)
    async with Batcher(fb, config) as b:
        flood = [asyncio.create_task(timed(b, f"a {i}", "A", 10)) for i in range(300)]
        await wait_until(lambda: b.stats().queue_depth + b.stats().running >= 300)
        late = [asyncio.create_task(timed(b, f"b {i}", "B", 10)) for i in range(10)]
        a_times, b_times = await asyncio.gather(asyncio.gather(*flood), asyncio.gather(*late))
    a_median, b_median = statistics.median(a_times), statistics.median(b_times)
    print(f"median completion: A (flood of 300) {a_median:.3f} s, B (10, after it) {b_median:.3f} s")
    assert b_median <= 0.25 * a_median


async def test_weights_three_to_one_split_the_tokens_three_to_one_under_saturation() -> None:
    fb = FakeBackend(step_time_s=0.001)
    config = BatchConfig(
        max_batch_size=8, max_queue=1000, batch_window_s=0.0, tenant_weights={"gold": 3.0, "free": 1.0}
    )
    b = Batcher(fb, config)
    async with b:
        tasks = [
            asyncio.create_task(b.generate(f"{t} {i}", max_tokens=8, tenant=t))
            for i in range(300)
            for t in ("gold", "free")
        ]
        await wait_until(lambda: sum(b.stats().tenant_tokens.values()) >= 2000)
        served = b.stats().tenant_tokens
        await b.aclose(timeout=0)  # both still had a backlog: end the rest
    await asyncio.gather(*tasks, return_exceptions=True)
    ratio = served["gold"] / served["free"]
    print(f"tokens served under saturation: gold {served['gold']}, free {served['free']}, ratio {ratio:.2f}")
    assert 3 * 0.85 <= ratio <= 3 * 1.15


async def test_each_tenant_has_its_own_queue_limit() -> None:
    fb = FakeBackend(step_time_s=0.01)
    config = BatchConfig(max_batch_size=1, tenant_max_queue=3, batch_window_s=0.0)
    async with Batcher(fb, config) as b:
        hog = b.stream("running", max_tokens=4000, tenant="A")
        await hog.__aenter__()
        await wait_until(lambda: b.stats().running == 1)
        queued = [b.stream(f"a {i}", max_tokens=2, tenant="A") for i in range(3)]
        for s in queued:
            await s.__aenter__()
        with pytest.raises(Overloaded, match="tenant 'A' has 3 requests queued") as info:
            await b.generate("one too many", tenant="A")
        assert info.value.retry_after > 0
        other = b.stream("B is still welcome", max_tokens=2, tenant="B")
        await other.__aenter__()
        for s in [hog, *queued, other]:
            await s.aclose()
        assert b.stats().outcomes["overloaded"] == 1
        assert b.engine_stats()[0].stats.tenants.named["A"].outcomes["overloaded"] == 1


async def test_a_tenant_must_be_a_short_string() -> None:
    async with Batcher(FakeBackend()) as b:
        for bad in ("", 7, "x" * 257):
            with pytest.raises(InvalidRequest, match="tenant must be"):
                await b.generate("hi", tenant=bad)  # type: ignore[arg-type]
    with pytest.raises(InvalidRequest, match="tenant_weights"):
        BatchConfig(tenant_weights={"a": 0.0})


def test_tenant_metrics_keep_the_heaviest_by_name_and_stay_monotonic() -> None:
    tally = TenantTally(k=3)
    seen: dict[str, float] = {}

    def check_monotonic() -> None:
        rows = {t: float(c.tokens) for t, c in tally.rows()}
        assert len(rows) <= 4  # k names + "other"
        for t, v in rows.items():
            if t in seen and t == OTHER_TENANTS:
                assert v >= seen[t], "the other counter never goes down"
        seen.update(rows)
        assert sum(rows.values()) == total

    total = 0
    for i in range(200):  # many light tenants arrive first...
        tally.ended(f"light{i}", "finished", 1)
        total += 1
        check_monotonic()
    for _ in range(50):  # ...then two heavy ones
        for heavy in ("heavy1", "heavy2"):
            tally.ended(heavy, "finished", 20)
            total += 20
            check_monotonic()
    assert {"heavy1", "heavy2"} <= set(tally.named)
    assert len(tally._score) <= 9 * 3 + 3


@pytest.mark.prometheus
async def test_tenant_metrics_on_prometheus() -> None:
    from prometheus_client import CollectorRegistry, generate_latest
    from prometheus_client.parser import text_string_to_metric_families

    reg = CollectorRegistry()
    async with Batcher(FakeBackend(), BatchConfig(tenant_metrics_top_k=2), registry=reg) as b:
        for t, n in (("a", 3), ("b", 2), ("c", 1), ("d", 1)):
            await asyncio.gather(*(b.generate(f"{t}{i}", max_tokens=4, tenant=t) for i in range(n)))
        text = generate_latest(reg).decode()
    families = {f.name: f for f in text_string_to_metric_families(text)}
    tokens = {s.labels["tenant"]: s.value for s in families["batcher_tenant_generated_tokens"].samples}
    assert tokens == {"a": 12.0, "b": 8.0, "other": 8.0}
    finished = {
        s.labels["tenant"]: s.value
        for s in families["batcher_tenant_requests"].samples
        if s.labels["outcome"] == "finished"
    }
    assert finished == {"a": 3.0, "b": 2.0, "other": 2.0}
    assert "batcher_tenant_queue_depth" in families
