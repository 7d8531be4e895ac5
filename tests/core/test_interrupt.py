"""Interrupted steps, on the shipped FakeBackend: a newcomer that arrives while a step that admits
nothing runs asks the backend to stop that step (``GenerationBackend.interrupt``), and joins the
very next step. No token may be lost or repeated by the stopped step, a step that admits is never
interrupted, and the stops are counted in the Prometheus exposition."""

from __future__ import annotations

import asyncio

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.parser import text_string_to_metric_families

from batcher import BatchConfig, Batcher
from batcher.backend import (
    GenerationBackend,
    NewSequence,
    PreparedPrompt,
    PrepareRequest,
    SamplingParams,
    StepResult,
)
from batcher.testing import FakeBackend

STEP_S = 0.25  # a slow decode step: a newcomer lands in the middle of one


async def collect(
    b: Batcher, prompt: str, max_tokens: int, started: asyncio.Event | None = None
) -> list[int]:
    tokens: list[int] = []
    async with b.stream(prompt, max_tokens=max_tokens) as stream:
        async for chunk in stream:
            tokens += chunk.token_ids
            if started is not None and tokens:
                started.set()
    return tokens


def exported(registry: CollectorRegistry, name: str) -> float:
    for family in text_string_to_metric_families(generate_latest(registry).decode()):
        for s in family.samples:
            if s.name == name:
                return float(s.value)
    raise AssertionError(f"{name} is not exported")


async def test_a_newcomer_stops_a_decode_step_and_joins_the_next_one() -> None:
    backend = FakeBackend(step_time_s=STEP_S)
    registry = CollectorRegistry()
    async with Batcher(backend, BatchConfig(max_batch_size=8), registry=registry) as b:
        started = asyncio.Event()
        running = asyncio.create_task(collect(b, "a long story", 6, started))
        await started.wait()
        await asyncio.sleep(STEP_S / 3)  # inside the running one's next (decode-only) step
        newcomer = await collect(b, "a short question", 2)
        story = await running
        stats = b.engine_stats()[0].stats
        assert exported(registry, "batcher_interrupted_steps_total") == stats.interrupted_steps
    # Every token arrived once and in order, although a step that owed the story one was stopped.
    assert story == backend.expected_tokens("a long story", SamplingParams(max_tokens=6))
    assert newcomer == backend.expected_tokens("a short question", SamplingParams(max_tokens=2))
    assert stats.interrupted_steps == len(backend.interrupted_steps) >= 1
    stopped = backend.interrupted_steps[0]
    assert backend.batch_sizes[stopped] == 1  # the story alone, decoding
    assert backend.batch_sizes[stopped + 1] == 2  # the newcomer joined the very next step
    assert backend.prefill_sizes[stopped + 1] > 0


async def test_steps_that_admit_are_never_interrupted() -> None:
    """Arrivals in pairs, some during steps that prefill, some during decode steps: the engine asks
    only the steps that admit nothing, and at most once each."""
    backend = FakeBackend(step_time_s=0.06, step_time_per_token_s=0.01)
    async with Batcher(backend, BatchConfig(max_batch_size=16)) as b:
        tasks = []
        for i in range(12):
            tasks.append(asyncio.create_task(collect(b, f"question {i} " + "word " * (i % 4), 4)))
            await asyncio.sleep(0.02 if i % 2 == 0 else 0.17)
        answers = await asyncio.gather(*tasks)
        steps = b.engine_stats()[0].stats.steps
    for i, got in enumerate(answers):
        assert got == backend.expected_tokens(
            f"question {i} " + "word " * (i % 4), SamplingParams(max_tokens=4)
        )
    calls = backend.interrupt_calls
    assert calls, "no newcomer ever met a running decode step: the test did not test anything"
    assert all(c in (0, None) for c in calls), calls  # 0: a step admitting nothing; None: between steps
    assert len(backend.interrupted_steps) <= len(calls)
    assert steps == len(backend.batch_sizes) - len(backend.interrupted_steps)


class _NoInterrupt:
    """A backend without ``interrupt``: the engine must not need one."""

    def __init__(self, inner: FakeBackend) -> None:
        self.inner = inner
        self.model_name = inner.model_name

    def start(self) -> None:
        self.inner.start()

    def prepare(self, requests: list[PrepareRequest]) -> list[PreparedPrompt | Exception]:
        return list(self.inner.prepare(requests))

    def step(self, admit: list[NewSequence], drop: list[int]) -> StepResult:
        return self.inner.step(admit, drop)

    def close(self) -> None:
        self.inner.close()


async def test_a_backend_without_interrupt_runs_its_steps_to_the_end() -> None:
    inner = FakeBackend(step_time_s=0.1)
    backend = _NoInterrupt(inner)
    assert isinstance(backend, GenerationBackend) and not hasattr(backend, "interrupt")
    async with Batcher(backend, BatchConfig(max_batch_size=8)) as b:
        started = asyncio.Event()
        running = asyncio.create_task(collect(b, "a long story", 4, started))
        await started.wait()
        await asyncio.sleep(0.03)
        assert await collect(b, "a short question", 2) == inner.expected_tokens(
            "a short question", SamplingParams(max_tokens=2)
        )
        await running
        assert b.engine_stats()[0].stats.interrupted_steps == 0
    assert inner.interrupt_calls == [] and inner.interrupted_steps == []
