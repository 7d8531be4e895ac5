"""Faults split, they don't spread: a step that raises is retried on halves of its batch until the
request to blame fails alone, and out of memory shrinks the batch while everyone else finishes.
On the shipped FakeBackend, which forgets its whole batch when a step raises (as the HF backend
does), so every survivor is really resumed from its prompt and the tokens it already had."""

from __future__ import annotations

import asyncio

import pytest

from batcher import BatchConfig, Batcher, RequestFailed
from batcher.backend import SamplingParams
from batcher.testing import FakeBackend


async def run_all(b: Batcher, fb: FakeBackend, prompts: list[str], max_tokens: int) -> list[object]:
    """Generate for every prompt at once; check each survivor's tokens against the fake's."""
    results = await asyncio.gather(
        *(b.generate(p, max_tokens=max_tokens) for p in prompts), return_exceptions=True
    )
    for p, r in zip(prompts, results, strict=True):
        if not isinstance(r, BaseException):
            assert list(r.token_ids) == fb.expected_tokens(p, SamplingParams(max_tokens=max_tokens))  # type: ignore[attr-defined]
    return list(results)


@pytest.mark.parametrize("poison_at", [0, 5, 13, 31])
async def test_a_poison_request_fails_alone_wherever_it_sits_in_the_batch(poison_at: int) -> None:
    fb = FakeBackend(step_time_s=0.001)
    prompts = [f"request {i}" + (" POISONOUS" if i == poison_at else "") for i in range(32)]
    async with Batcher(fb, BatchConfig(max_batch_size=32, batch_window_s=0.05)) as b:
        results = await run_all(b, fb, prompts, max_tokens=6)
        stats = b.stats()
    failed = [i for i, r in enumerate(results) if isinstance(r, BaseException)]
    assert failed == [poison_at]
    assert isinstance(results[poison_at], RequestFailed)
    assert "POISONOUS" in str(results[poison_at].__cause__)  # type: ignore[union-attr]
    assert stats.outcomes["finished"] == 31 and stats.outcomes["failed"] == 1
    assert fb.live_sequences == 0
    # bisection: about log2(32) splits, not one per request
    engine = b.engine_stats()[0].stats
    assert 1 <= engine.step_splits <= 6


async def test_a_poison_request_that_joins_a_running_batch_fails_alone() -> None:
    fb = FakeBackend(step_time_s=0.002)
    async with Batcher(fb, BatchConfig(max_batch_size=16, batch_window_s=0.0)) as b:
        long = [asyncio.create_task(b.generate(f"long {i}", max_tokens=40)) for i in range(8)]
        await asyncio.sleep(0.02)  # they run; then the poison arrives mid-flight
        bad = asyncio.create_task(b.generate("late POISONOUS", max_tokens=40))
        done = await asyncio.gather(*long)
        with pytest.raises(RequestFailed):
            await bad
    for i, c in enumerate(done):
        assert list(c.token_ids) == fb.expected_tokens(f"long {i}", SamplingParams(max_tokens=40))


async def test_out_of_memory_above_a_batch_size_shrinks_the_batch_and_all_finish() -> None:
    fb = FakeBackend(step_time_s=0.001)
    fb.oom_above = 10
    prompts = [f"request {i}" for i in range(40)]
    async with Batcher(fb, BatchConfig(max_batch_size=32, batch_window_s=0.05)) as b:
        results = await run_all(b, fb, prompts, max_tokens=8)
        splits = b.engine_stats()[0].stats.step_splits
    assert not [r for r in results if isinstance(r, BaseException)]
    assert max(fb.batch_sizes) > 10, "the first batch did run out of memory"
    ok = fb.batch_sizes[fb.batch_sizes.index(max(fb.batch_sizes)) :]
    assert splits >= 1 and sum(1 for n in ok if n > 10) <= 2, "it shrank: 32 -> 16 -> 8"
    assert max(fb.batch_sizes[-20:]) <= 10


async def test_out_of_memory_with_one_sequence_fails_only_it() -> None:
    fb = FakeBackend(step_time_s=0.001)
    fb.oom_above = 0
    async with Batcher(fb, BatchConfig(batch_window_s=0.0)) as b:
        with pytest.raises(RequestFailed, match="out of memory with this request alone"):
            await b.generate("too big", max_tokens=4)
        fb.oom_above = None
        assert (await b.generate("fine now", max_tokens=4)).finish_reason == "length"


async def test_after_out_of_memory_the_batch_grows_back_to_the_real_limit() -> None:
    """Halving from 32 undershoots a limit of 10 (32 -> 16 -> 8); clean steps grow the cap back
    an eighth at a time, never to a size that failed, so it settles at the limit itself."""
    fb = FakeBackend(step_time_s=0.0005)
    fb.oom_above = 10
    prompts = [f"request {i}" for i in range(100)]
    async with Batcher(fb, BatchConfig(max_batch_size=32, batch_window_s=0.05)) as b:
        results = await run_all(b, fb, prompts, max_tokens=60)
        splits = b.engine_stats()[0].stats.step_splits
    assert not [r for r in results if isinstance(r, BaseException)]
    failed = [n for n in fb.batch_sizes if n > 10]
    assert 2 <= len(failed) <= 5, f"a few probes above the limit, not a storm: {failed}"
    last_failure = max(i for i, n in enumerate(fb.batch_sizes) if n > 10)
    assert 10 in fb.batch_sizes[last_failure:], "the cap settles at the real limit, not below it"
    assert splits == len(failed)


class ShortOnce(FakeBackend):
    """Out of memory above ``oom_above`` once: then the memory comes back (another process let go)."""

    def _raise_if_broken(self, batch: int) -> None:
        try:
            super()._raise_if_broken(batch)
        except MemoryError:
            self.oom_above = None
            raise


async def test_after_a_transient_out_of_memory_the_batch_grows_back() -> None:
    fb = ShortOnce(step_time_s=0.0005)
    fb.oom_above = 10
    prompts = [f"request {i}" for i in range(64)]
    async with Batcher(fb, BatchConfig(max_batch_size=32, batch_window_s=0.05)) as b:
        results = await run_all(b, fb, prompts, max_tokens=150)
        assert b.engine_stats()[0].stats.step_splits == 1
    assert not [r for r in results if isinstance(r, BaseException)]
    first = fb.batch_sizes.index(32)  # the step that ran out of memory
    after = fb.batch_sizes[first + 1 :]
    assert max(after[:5]) == 16, "halved first"
    assert max(after) == 31, f"then grown back to just below the size that failed: {max(after)}"
