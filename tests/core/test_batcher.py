"""The batcher's promises, on the shipped FakeBackend: continuous batching, cancellation at every
stage, deadlines, backpressure, error isolation, graceful close, several engines, threads."""

from __future__ import annotations

import asyncio
import threading

import pytest

from batcher import (
    BatchConfig,
    Batcher,
    BatcherClosed,
    Chunk,
    DeadlineExceeded,
    InvalidRequest,
    Overloaded,
    RequestFailed,
)
from batcher.backend import SamplingParams
from batcher.testing import FakeBackend

FAST = BatchConfig(batch_window_s=0.0)


def fake(**kwargs: object) -> FakeBackend:
    """A FakeBackend with room for the very long requests these tests cancel midway."""
    return FakeBackend(max_context=1_000_000, **kwargs)  # type: ignore[arg-type]


def batcher_threads() -> list[str]:
    return [t.name for t in threading.enumerate() if t.name.startswith("batcher-")]


async def wait_until(cond, timeout: float = 5.0) -> None:  # type: ignore[no-untyped-def]
    """Wait on the loop clock for a condition the batcher makes true between steps."""
    async with asyncio.timeout(timeout):
        while not cond():
            await asyncio.sleep(0.001)


async def test_stream_delivers_the_backends_tokens_then_a_final_chunk() -> None:
    fb = fake(step_time_s=0.003)  # slower than the pipelining threshold: one chunk per step
    async with Batcher(fb, FAST) as b:
        chunks = [c async for c in b.stream("hello there", max_tokens=4)]
    assert [c.finish_reason for c in chunks] == [None, None, None, "length"]
    ids = [i for c in chunks for i in c.token_ids]
    assert ids == fb.expected_tokens("hello there", SamplingParams(max_tokens=4))
    assert "".join(c.text for c in chunks) == "".join(fb.token_text(i) for i in ids)
    assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens == 4
    assert chunks[-1].usage.prompt_tokens == 2


async def test_fast_steps_are_pipelined_and_streams_stay_exact() -> None:
    """With near-zero step times the engine keeps a second step queued on the device thread; a
    stream may then get two steps' tokens in one chunk, but every token arrives once, in order,
    and only the last chunk carries the finish reason."""
    fb = fake()
    lags: list[int] = []  # per step call: calls sent so far minus steps the loop has completed
    b = Batcher(fb, FAST)
    step = fb.step

    def watched_step(admit, drop):  # type: ignore[no-untyped-def]
        lags.append(len(lags) - b.stats().steps)
        return step(admit, drop)

    fb.step = watched_step  # type: ignore[method-assign]
    prompts = [f"stream number {i}" for i in range(24)]
    async with b:

        async def consume(p: str) -> list[Chunk]:
            return [c async for c in b.stream(p, max_tokens=40)]

        results = await asyncio.gather(*(consume(p) for p in prompts))
        steps = b.stats().steps
    # Pipelined: some step started before the loop had taken the previous step's result. Never
    # more than one step ahead.
    assert max(lags) == 1
    for p, chunks in zip(prompts, results, strict=True):
        assert [c.finish_reason for c in chunks][-1] == "length"
        assert all(c.finish_reason is None and c.token_ids for c in chunks[:-1])
        ids = [i for c in chunks for i in c.token_ids]
        assert ids == fb.expected_tokens(p, SamplingParams(max_tokens=40))
        assert "".join(c.text for c in chunks) == "".join(fb.token_text(i) for i in ids)
    # 40 steps produce the tokens; a few more may carry late arrivals or drops, never a runaway
    # of empty pipelined steps.
    assert 40 <= steps < 60


async def test_eos_and_stop_strings_end_with_stop() -> None:
    fb = fake()
    async with Batcher(fb, FAST) as b:
        eos = await b.generate("say eos:3 please", max_tokens=10)
        assert eos.finish_reason == "stop" and len(eos.token_ids) == 3
        full = await b.generate("abc", max_tokens=6)
        stop = full.text.split()[2]  # the third token's text
        cut = await b.generate("abc", max_tokens=6, stop=[stop])
        assert cut.finish_reason == "stop" and stop not in cut.text
        assert full.text.startswith(cut.text)


async def test_requests_join_a_running_batch_between_steps() -> None:
    fb = fake(step_time_s=0.005)
    async with Batcher(fb, FAST) as b:
        async with b.stream("first request", max_tokens=40) as first:
            got_first = [await first.__anext__()]
            second = await b.generate("second", max_tokens=5)  # joins while the first runs
            assert b.stats().running == 1  # the first is still running: nobody waited for it
            got_first += [c async for c in first]
        assert second.finish_reason == "length"
        assert sum(len(c.token_ids) for c in got_first) == 40
    assert 2 in fb.batch_sizes and fb.batch_sizes[0] == 1 and fb.batch_sizes[-1] == 1


async def test_finished_sequences_leave_at_once() -> None:
    fb = fake(step_time_s=0.001)
    async with Batcher(fb, FAST) as b:
        await asyncio.gather(b.generate("short", max_tokens=2), b.generate("long", max_tokens=30))
    # the short one left after its 2nd token: the batch shrank to 1 for the remaining steps
    assert fb.batch_sizes.count(2) <= 2 and fb.batch_sizes.count(1) >= 28


async def test_cancel_running_stream_by_break_drops_the_sequence() -> None:
    fb = fake(step_time_s=0.002)
    async with Batcher(fb, FAST) as b:
        async with b.stream("keep going", max_tokens=10_000) as s:
            async for _ in s:
                break
        await wait_until(lambda: fb.live_sequences == 0 and b.stats().running == 0)
        assert b.stats().outcomes["cancelled"] == 1


async def test_cancel_by_task_cancellation_propagates_and_frees_the_slot() -> None:
    fb = fake(step_time_s=0.002)
    started = asyncio.Event()

    async def consume() -> None:
        async for _ in b.stream("forever", max_tokens=10_000):
            started.set()

    async with Batcher(fb, FAST) as b:
        task = asyncio.create_task(consume())
        await started.wait()
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        await wait_until(lambda: fb.live_sequences == 0)
        assert b.stats().outcomes["cancelled"] == 1
        # the engine goes on serving
        assert (await b.generate("next", max_tokens=2)).finish_reason == "length"


async def test_cancel_while_queued_never_reaches_the_backend() -> None:
    fb = fake(step_time_s=0.002)
    async with Batcher(fb, BatchConfig(max_batch_size=1, batch_window_s=0)) as b:
        async with b.stream("occupies the only slot", max_tokens=10_000) as hog:
            await hog.__anext__()
            queued = asyncio.create_task(b.generate("queued", max_tokens=5))
            await wait_until(lambda: b.stats().queue_depth == 1)
            queued.cancel()
            with pytest.raises(asyncio.CancelledError):
                await queued
            assert b.stats().queue_depth == 0
        assert max(fb.batch_sizes) == 1
        assert b.stats().outcomes["cancelled"] == 2


class SlowPrepare(FakeBackend):
    """Tokenization that blocks until released: to catch a request while it is being prepared."""

    def __init__(self) -> None:
        super().__init__(max_context=1_000_000)
        self.release = threading.Event()

    def prepare(self, requests):  # type: ignore[no-untyped-def]
        self.release.wait(5)
        return super().prepare(requests)


async def test_cancel_while_preparing() -> None:
    fb = SlowPrepare()
    async with Batcher(fb, FAST) as b:
        task = asyncio.create_task(b.generate("being tokenized", max_tokens=3))
        await wait_until(lambda: b.stats().queue_depth == 1)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        fb.release.set()
        assert b.stats().queue_depth == 0
        assert (await b.generate("after", max_tokens=1)).usage.completion_tokens == 1
        assert b.stats().outcomes["cancelled"] == 1
    assert fb.batch_sizes == [1]  # only "after" ever ran


async def test_close_timeout_ends_a_request_being_tokenized() -> None:
    """A request still on the host thread when the drain times out ends with the others: it is
    never queued or run afterwards."""
    fb = SlowPrepare()
    b = Batcher(fb, FAST)
    await b.start()
    task = asyncio.create_task(b.generate("being tokenized", max_tokens=3))
    await wait_until(lambda: b.stats().queue_depth == 1)
    closing = asyncio.create_task(b.aclose(timeout=0.05))
    with pytest.raises(BatcherClosed, match="shut down"):
        await task
    fb.release.set()
    await closing
    assert b.stats().outcomes["shutdown"] == 1 and b.stats().queue_depth == 0
    assert fb.batch_sizes == [] and batcher_threads() == []


async def test_deadline_in_the_queue() -> None:
    fb = fake(step_time_s=0.002)
    async with Batcher(fb, BatchConfig(max_batch_size=1, batch_window_s=0)) as b:
        async with b.stream("hog", max_tokens=10_000) as hog:
            await hog.__anext__()
            with pytest.raises(DeadlineExceeded, match="in the queue"):
                await b.generate("late", max_tokens=3, deadline_s=0.05)
        assert b.stats().outcomes["deadline"] == 1


async def test_deadline_inside_a_running_batch() -> None:
    fb = fake(step_time_s=0.002)
    async with Batcher(fb, FAST) as b:
        got = []
        with pytest.raises(DeadlineExceeded, match=r"after \d+ tokens"):
            async for c in b.stream("slow answer", max_tokens=30_000, deadline_s=0.1):
                got.append(c)
        assert got, "tokens produced before the deadline were delivered"
        await wait_until(lambda: fb.live_sequences == 0)
        assert b.stats().outcomes["deadline"] == 1


async def test_full_queue_is_refused_at_once_with_retry_after() -> None:
    fb = fake(step_time_s=0.002)
    cfg = BatchConfig(max_batch_size=1, max_queue=2, batch_window_s=0)
    async with Batcher(fb, cfg) as b:
        async with b.stream("hog", max_tokens=10_000) as hog:
            await hog.__anext__()
            waiting = [asyncio.create_task(b.generate(f"w{i}", max_tokens=1)) for i in range(2)]
            await wait_until(lambda: b.stats().queue_depth == 2)
            with pytest.raises(Overloaded) as info:
                async with b.stream("one too many"):
                    pass
            assert info.value.retry_after > 0
            assert "max_queue=2" in str(info.value)
            with pytest.raises(Overloaded):
                await b.generate("another")
        await asyncio.gather(*waiting)
        assert b.stats().outcomes["overloaded"] == 2


async def test_a_failing_step_fails_its_requests_and_the_engine_goes_on() -> None:
    fb = fake(step_time_s=0.002)
    async with Batcher(fb, FAST) as b:
        async with b.stream("victim", max_tokens=10_000) as s:
            await s.__anext__()
            fb.fail_next_steps(1)
            with pytest.raises(RequestFailed) as info:
                async for _ in s:
                    pass
        assert isinstance(info.value.__cause__, RuntimeError)
        assert (await b.generate("survivor", max_tokens=3)).finish_reason == "length"
        await wait_until(lambda: fb.live_sequences == 0)
        assert b.stats().outcomes["failed"] == 1


async def test_a_blamed_sequence_fails_alone() -> None:
    fb = fake(step_time_s=0.001)
    async with Batcher(fb, FAST) as b:
        results = await asyncio.gather(
            b.generate("good one", max_tokens=5),
            b.generate("bad FAIL one", max_tokens=5),
            b.generate("good two", max_tokens=5),
            return_exceptions=True,
        )
    assert isinstance(results[1], RequestFailed) and isinstance(results[1].__cause__, ValueError)
    assert results[0].finish_reason == results[2].finish_reason == "length"  # type: ignore[union-attr]


async def test_rejected_by_backend_prepare() -> None:
    async with Batcher(fake(), FAST) as b:
        with pytest.raises(InvalidRequest, match="REJECT"):
            await b.generate("please REJECT me")
        assert b.stats().outcomes["rejected"] == 1


async def test_graceful_close_lets_running_streams_finish() -> None:
    fb = fake(step_time_s=0.002)
    b = Batcher(fb, FAST)
    await b.start()
    s = b.stream("finish me", max_tokens=30)
    await s.__aenter__()
    first = await s.__anext__()
    closing = asyncio.create_task(b.aclose(timeout=10))
    await wait_until(lambda: b.state == "draining")
    assert not b.ready
    with pytest.raises(BatcherClosed, match="draining"):
        await b.generate("too late")
    rest = [c async for c in s]
    await closing
    assert len(first.token_ids) + sum(len(c.token_ids) for c in rest) == 30
    assert rest[-1].finish_reason == "length"
    assert b.state == "closed" and fb.closed and fb.live_sequences == 0
    assert batcher_threads() == []


async def test_close_timeout_ends_the_rest_with_a_terminal_reason() -> None:
    fb = fake(step_time_s=0.002)
    async with Batcher(fb, FAST) as b:
        s = b.stream("never ends", max_tokens=30_000)
        await s.__aenter__()
        await s.__anext__()
        await b.aclose(timeout=0.05)
        with pytest.raises(BatcherClosed, match="shut down"):
            async for _ in s:
                pass
        assert b.stats().outcomes["shutdown"] == 1
    assert fb.closed and fb.live_sequences == 0 and batcher_threads() == []


async def test_unstarted_batcher_says_how_to_start() -> None:
    b = Batcher(fake())
    with pytest.raises(BatcherClosed, match="async with"):
        await b.generate("hi")


async def test_backend_code_never_runs_on_the_event_loop_thread() -> None:
    fb = fake(step_time_s=0.001)
    loop_thread = threading.get_ident()
    async with Batcher(fb, FAST) as b:
        await asyncio.gather(*(b.generate(f"p{i}", max_tokens=3) for i in range(10)))
    used = set().union(*fb.threads.values())
    assert loop_thread not in used
    # one dedicated device thread runs start/step/close; tokenization runs on the host thread
    assert len(fb.threads["step"]) == 1
    assert fb.threads["start"] == fb.threads["step"] == fb.threads["close"]
    assert fb.threads["prepare"] and fb.threads["prepare"].isdisjoint(fb.threads["step"])


async def test_the_loop_is_never_blocked() -> None:
    """blockbuster raises inside the loop thread on any blocking call (sleep, file, socket)."""
    from blockbuster import blockbuster_ctx

    fb = fake(step_time_s=0.002)  # sleeps: allowed on its own thread only
    with blockbuster_ctx():
        async with Batcher(fb, FAST) as b:
            results = await asyncio.gather(*(b.generate(f"p{i}", max_tokens=5) for i in range(20)))
    assert all(r.usage.completion_tokens == 5 for r in results)


async def test_least_loaded_engine_gets_the_next_request() -> None:
    backends = [fake(step_time_s=0.002), fake(step_time_s=0.002)]
    async with Batcher(backends, FAST) as b:
        streams = [b.stream(f"long {i}", max_tokens=10_000) for i in range(6)]
        for s in streams:
            await s.__aenter__()
        await wait_until(lambda: [e.running for e in b.engine_stats()] == [3, 3])
        assert [e.name for e in b.engine_stats()] == ["0", "1"]
        assert b.stats().running == 6
        for s in streams:
            await s.aclose()
    assert all(max(fb.batch_sizes) == 3 for fb in backends)


async def test_metrics_on_the_callers_registry() -> None:
    from prometheus_client import REGISTRY, CollectorRegistry, generate_latest
    from prometheus_client.parser import text_string_to_metric_families

    reg = CollectorRegistry()
    async with (
        Batcher(fake(model_name="m1"), FAST, registry=reg) as b1,
        Batcher(fake(model_name="m2"), FAST, registry=reg) as b2,
    ):
        await asyncio.gather(*(b1.generate(f"x{i}", max_tokens=4) for i in range(5)))
        await b2.generate("y", max_tokens=2)
        text = generate_latest(reg).decode()
    families = {f.name: f for f in text_string_to_metric_families(text)}
    expected = {
        "batcher_queue_depth",
        "batcher_running_requests",
        "batcher_max_queue",
        "batcher_max_batch_size",
        "batcher_batch_size",
        "batcher_batch_tokens",
        "batcher_queue_wait_seconds",
        "batcher_time_to_first_token_seconds",
        "batcher_inter_token_latency_seconds",
        "batcher_request_duration_seconds",
        "batcher_step_duration_seconds",
        "batcher_requests",
        "batcher_generated_tokens",
        "batcher_prompt_tokens",
        "batcher_executor_busy_seconds",
        "batcher_padding_tokens",
        "batcher_computed_tokens",
    }
    assert expected <= set(families)
    finished = {
        s.labels["model"]: s.value
        for s in families["batcher_requests"].samples
        if s.name == "batcher_requests_total" and s.labels["outcome"] == "finished"
    }
    assert finished == {"m1": 5.0, "m2": 1.0}
    generated = {
        s.labels["model"]: s.value
        for s in families["batcher_generated_tokens"].samples
        if s.name.endswith("_total")
    }
    assert generated == {"m1": 20.0, "m2": 2.0}
    assert b"batcher_" not in generate_latest(REGISTRY)  # never the global registry
    assert "batcher_queue_depth{" not in generate_latest(reg).decode()  # closed batchers leave


# -- one-shot batch functions --------------------------------------------------------------


async def test_infer_batches_concurrent_calls() -> None:
    sizes: list[int] = []

    def double(xs: list[int]) -> list[int]:
        sizes.append(len(xs))
        return [2 * x for x in xs]

    async with Batcher(double, BatchConfig(max_batch_size=8, batch_window_s=0.01)) as b:
        results = await asyncio.gather(*(b.infer(i) for i in range(64)))
    assert results == [2 * i for i in range(64)]
    assert max(sizes) == 8 and sum(sizes) == 64 and len(sizes) <= 16


async def test_infer_full_batch_does_not_wait_for_the_window() -> None:
    async with Batcher(lambda xs: xs, BatchConfig(max_batch_size=4, batch_window_s=60)) as b:
        async with asyncio.timeout(10):  # would take 60 s if the window were waited out
            assert await asyncio.gather(*(b.infer(i) for i in range(4))) == [0, 1, 2, 3]


async def test_infer_item_errors_and_batch_errors() -> None:
    def picky(xs: list[int]) -> list[object]:
        if 99 in xs:
            raise RuntimeError("boom")
        return [ValueError("odd") if x % 2 else x for x in xs]

    async with Batcher(picky, BatchConfig(max_batch_size=4, batch_window_s=0.01)) as b:
        out = await asyncio.gather(*(b.infer(i) for i in range(4)), return_exceptions=True)
        assert out[0] == 0 and out[2] == 2
        assert isinstance(out[1], RequestFailed) and isinstance(out[1].__cause__, ValueError)
        with pytest.raises(RequestFailed, match="boom"):
            await b.infer(99)
        assert await b.infer(4) == 4  # still serving
        with pytest.raises(InvalidRequest, match="infer"):
            b.stream("not for a batch function")
        stats = b.stats()
    assert stats.outcomes["finished"] == 3 and stats.outcomes["failed"] == 3


async def test_infer_wrong_length_output_is_a_clear_error() -> None:
    async with Batcher(lambda xs: xs[:-1], BatchConfig(batch_window_s=0)) as b:
        with pytest.raises(RequestFailed, match="one per input"):
            await b.infer(1)


async def test_infer_cancelled_while_waiting() -> None:
    seen: list[int] = []

    def slow(xs: list[int]) -> list[int]:
        import time

        seen.extend(xs)
        time.sleep(0.05)
        return xs

    async with Batcher(slow, BatchConfig(max_batch_size=1, batch_window_s=0)) as b:
        first = asyncio.create_task(b.infer(1))
        await wait_until(lambda: b.stats().running == 1)
        second = asyncio.create_task(b.infer(2))
        await wait_until(lambda: b.stats().queue_depth == 1)
        second.cancel()
        with pytest.raises(asyncio.CancelledError):
            await second
        assert await first == 1
        assert await b.infer(3) == 3
    assert seen == [1, 3]
    assert b.stats().outcomes["cancelled"] == 1


async def test_close_drains_queued_and_running_one_shot_calls() -> None:
    def slow(xs: list[int]) -> list[int]:
        import time

        time.sleep(0.02)
        return [x + 1 for x in xs]

    b = Batcher(slow, BatchConfig(max_batch_size=1, batch_window_s=0))
    await b.start()
    calls = [asyncio.create_task(b.infer(i)) for i in range(3)]
    await wait_until(lambda: b.stats().running == 1 and b.stats().queue_depth == 2)
    await b.aclose(timeout=10)
    assert [c.result() for c in calls] == [1, 2, 3]
    assert b.stats().outcomes["finished"] == 3 and batcher_threads() == []


async def test_the_wrong_kind_of_call_is_refused_and_counted() -> None:
    async with Batcher(lambda xs: xs, FAST) as one_shot, Batcher(fake(), FAST) as generation:
        with pytest.raises(InvalidRequest, match="infer"):
            await one_shot.generate("hi")
        with pytest.raises(InvalidRequest, match="stream"):
            await generation.infer(1)
        assert one_shot.stats().outcomes["rejected"] == generation.stats().outcomes["rejected"] == 1


async def test_higher_priority_waiting_request_runs_first() -> None:
    fb = fake(step_time_s=0.002)
    order: list[str] = []

    async def run(name: str, priority: int) -> None:
        await b.generate(name, max_tokens=2, priority=priority)
        order.append(name)

    async with Batcher(fb, BatchConfig(max_batch_size=1, batch_window_s=0)) as b:
        async with b.stream("hog", max_tokens=10_000) as hog:
            await hog.__anext__()
            low = asyncio.create_task(run("low", 0))
            await wait_until(lambda: b.stats().queue_depth == 1)
            high = asyncio.create_task(run("high", 10))
            await wait_until(lambda: b.stats().queue_depth == 2)
        await asyncio.gather(low, high)
    assert order == ["high", "low"]
