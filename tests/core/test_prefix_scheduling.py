"""The scheduler and a backend's prefix cache, on the shipped FakeBackend: its step time grows with
the prompt tokens it prefills, and its cache serves the prefixes it has seen (and says so in
``PreparedPrompt.cached_tokens``). A cached prefix must cost a newcomer less: more of them join a
step, they are served sooner, and the step-cost model learns from the tokens really computed."""

from __future__ import annotations

import asyncio

from batcher import BatchConfig, Batcher, Overloaded
from batcher._continuous import GenerationEngine
from batcher.testing import FakeBackend

SYSTEM = " ".join(f"rule{i}" for i in range(400))  # 400 tokens: 50 whole cache blocks


def question(i: int) -> str:
    return f"{SYSTEM} question {i} please"  # 403 tokens, 400 of them cacheable


def fake(cache: bool) -> FakeBackend:
    return FakeBackend(
        step_time_s=0.002, step_time_per_token_s=0.0001, prefix_cache_tokens=4096 if cache else 0
    )


async def first_tokens(b: Batcher, n: int) -> list[float]:
    """Send ``n`` questions at once; each one's time to its first token."""
    loop = asyncio.get_running_loop()
    t0 = loop.time()

    async def one(i: int) -> float:
        async with b.stream(question(i), max_tokens=3) as stream:
            async for chunk in stream:
                if chunk.token_ids:
                    return loop.time() - t0
        raise AssertionError("no token")

    return list(await asyncio.gather(*(one(i) for i in range(n))))


async def burst(backend: FakeBackend, config: BatchConfig) -> tuple[list[float], list[int]]:
    """A warm-up (the system prompt enters the cache), then 8 questions at once: their TTFTs, and
    the prompt tokens each step of the burst prefilled."""
    async with Batcher(backend, config) as b:
        await b.generate(question(-1), max_tokens=1)
        before = len(backend.prefill_sizes)
        ttfts = await first_tokens(b, 8)
    return ttfts, [n for n in backend.prefill_sizes[before:] if n]


async def test_cached_prefix_newcomers_share_a_step_and_are_served_sooner() -> None:
    config = BatchConfig(max_batch_size=16, max_prefill_tokens=512)
    warm_ttfts, warm_steps = await burst(fake(cache=True), config)
    cold_ttfts, cold_steps = await burst(fake(cache=False), config)
    # Cold, a 403-token prompt fills the step's 512-token prefill budget: one newcomer per step.
    assert cold_steps == [403] * 8
    # Cached, each computes 3 tokens: they join together (in as many steps as prepare batches).
    assert sum(warm_steps) == 8 * 3 and len(warm_steps) <= 3
    assert max(warm_ttfts) < 0.5 * max(cold_ttfts), (warm_ttfts, cold_ttfts)


async def test_a_long_cold_prompt_waits_for_its_own_step_instead_of_swelling_one() -> None:
    _, budgeted = await burst(fake(cache=False), BatchConfig(max_batch_size=16, max_prefill_tokens=512))
    _, unlimited = await burst(fake(cache=False), BatchConfig(max_batch_size=16, max_prefill_tokens=None))
    assert sum(budgeted) == sum(unlimited) == 8 * 403
    # With the budget no step prefills two of them (so a decoding row waits for one prompt's
    # prefill at most); without it the prompts prepared together are prefilled together.
    assert max(budgeted) == 403 and max(unlimited) >= 2 * 403


async def test_the_cost_model_learns_from_uncached_tokens_only() -> None:
    backend = fake(cache=True)
    async with Batcher(backend, BatchConfig(max_batch_size=16, max_prefill_tokens=512)) as b:
        for _ in range(3):
            await b.generate(question(-1), max_tokens=1)
            await first_tokens(b, 8)
        (engine,) = b._engines
        assert isinstance(engine, GenerationEngine)
        cost = engine.cost
        assert cost.ready
        steps = engine.stats.steps  # completed (a last one may still run)
        # The model saw the prompt tokens each step computed, not the 403 of each prompt.
        assert cost.mean_new_tokens == sum(backend.prefill_sizes[:steps]) / steps
        assert cost.mean_new_tokens < 0.2 * (3 * 9 * 403) / steps


async def slo_admits_a_ninth(cache: bool) -> bool:
    """With 8 questions queued (cold: 8 steps of prefill under the budget), whether a ninth is
    admitted under a 0.1 s time-to-first-token objective."""
    config = BatchConfig(max_batch_size=16, max_prefill_tokens=512, ttft_slo_s=0.1)
    async with Batcher(fake(cache), config) as b:
        await b.generate(question(-1), max_tokens=10)  # 10 steps: the cost model is ready
        streams = [b.stream(question(i), max_tokens=2) for i in range(8)]
        await asyncio.gather(*(s.__aenter__() for s in streams))  # all 8 tokenized and queued
        try:
            async with b.stream(question(99), max_tokens=2):
                return True
        except Overloaded:
            return False
        finally:
            for s in streams:
                await s.__aexit__(None, None, None)


async def test_slo_admission_counts_the_queued_uncached_prefill_only() -> None:
    # Cold, the 8 queued prompts take 8 steps of prefill (>= 20 ms each) before a ninth's: refused
    # at once. Cached, they compute 3 tokens each and all join the next step: admitted.
    assert not await slo_admits_a_ninth(cache=False)
    assert await slo_admits_a_ninth(cache=True)
