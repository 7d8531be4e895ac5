"""The pipeline owns a request's life: one stage at a time, the counts read off the stages, every
end through one callback. Driven by hand here, with no engine, thread or backend."""

from __future__ import annotations

import asyncio

import pytest

from batcher import BatchConfig, InvalidRequest, PromptTooLong, RequestFailed
from batcher._pipeline import Pipeline
from batcher._request import DONE, PREPARING, RUNNING, WAITING, GenRequest
from batcher._stats import DrainRate, EngineStats
from batcher.backend import PreparedPrompt, SamplingParams, SeqOutput, StepResult


def pipeline(token_budget: int | None = None, **config: int) -> tuple[Pipeline, list[str]]:
    """A pipeline, and the list its calls to the engine ("wake", "idle") append to."""
    calls: list[str] = []
    p = Pipeline(
        BatchConfig(**config),
        token_budget,
        EngineStats(),
        DrainRate(),
        wake=lambda: calls.append("wake"),
        idle=lambda: calls.append("idle"),
    )
    return p, calls


def counts(p: Pipeline) -> tuple[int, int, int, int, int]:
    return p.preparing, p.waiting, p.running, p.queue_depth, p.live


def admit(p: Pipeline, seq_id: int, max_tokens: int = 4) -> GenRequest:
    return p.admit(seq_id, f"prompt {seq_id}", SamplingParams(max_tokens=max_tokens), 0, None)


async def test_requests_move_through_the_stages_and_the_counts_follow() -> None:
    p, calls = pipeline(max_batch_size=2)
    reqs = [admit(p, i) for i in (1, 2, 3)]
    assert [r.stage for r in reqs] == [PREPARING] * 3 and counts(p) == (3, 0, 0, 3, 3)
    for r in reqs:
        p.queue(r, PreparedPrompt([7, 8]))
    assert [r.stage for r in reqs] == [WAITING] * 3 and counts(p) == (0, 3, 0, 3, 3)
    assert calls and set(calls) == {"wake"}, "a waiting request wakes the engine"
    now = asyncio.get_running_loop().time()
    admitted = p.plan(now)
    assert [(n.seq_id, tuple(n.prompt_ids)) for n in admitted] == [(1, (7, 8)), (2, (7, 8))]
    assert [r.stage for r in reqs] == [RUNNING, RUNNING, WAITING] and counts(p) == (0, 1, 2, 1, 3)
    # The backend finishes 1 (it freed it itself); 2 gets a token and stays.
    p.deliver(StepResult([SeqOutput(1, (5,), " a", "stop"), SeqOutput(2, (6,), " b")]), now)
    assert reqs[0].stage == DONE and reqs[0].outcome == "finished" and not p.has_drops
    assert counts(p) == (0, 1, 1, 1, 2) and p.stats.generated_tokens == 2
    # The consumer cancels 2 while it runs: the backend still holds it, so it is dropped next step.
    reqs[1].cancel()
    assert p.take_drops() == [2] and counts(p) == (0, 1, 0, 1, 1)
    assert "idle" not in calls
    reqs[2].cancel()  # while waiting: nothing to drop
    assert not p.has_drops and counts(p) == (0, 0, 0, 0, 0) and calls[-1] == "idle"
    assert (p.stats.outcomes["finished"], p.stats.outcomes["cancelled"]) == (1, 2)
    assert p.stats.duration.count == 3  # one end each, whoever ended it


async def test_prepare_results_refuse_what_can_never_run() -> None:
    p, _ = pipeline(token_budget=10)
    too_long, invalid, empty, broken, fine = (admit(p, i, max_tokens=4) for i in range(1, 6))
    p.queue(too_long, PreparedPrompt(list(range(7))))  # 7 + 4 > 10
    p.queue(invalid, InvalidRequest("no", field="prompt"))
    p.queue(empty, PreparedPrompt([]))
    p.queue(broken, RuntimeError("tokenizer crashed"))
    p.queue(fine, PreparedPrompt([1, 2]))
    assert [r.outcome for r in (too_long, invalid, empty, broken)] == [
        "rejected",
        "rejected",
        "rejected",
        "failed",
    ]
    with pytest.raises(PromptTooLong, match="budget of 10"):
        too_long.take_chunk()
    assert counts(p) == (0, 1, 0, 1, 1) and fine.stage == WAITING
    assert p.stats.outcomes["rejected"] == 3 and p.stats.outcomes["failed"] == 1


async def test_a_failed_step_fails_and_drops_every_running_sequence() -> None:
    p, _ = pipeline(token_budget=100)
    reqs = [admit(p, i) for i in (1, 2)]
    for r in reqs:
        p.queue(r, PreparedPrompt([1]))
    p.plan(asyncio.get_running_loop().time())
    p.fail_running(RuntimeError("device lost"), batch=2)
    assert [r.outcome for r in reqs] == ["failed", "failed"] and sorted(p.take_drops()) == [1, 2]
    with pytest.raises(RequestFailed, match="device lost"):
        reqs[0].take_chunk()
    # the budget the two reserved is free again: both fit once more
    again = [admit(p, i) for i in (3, 4)]
    for r in again:
        p.queue(r, PreparedPrompt(list(range(45))))
    assert len(p.plan(asyncio.get_running_loop().time())) == 2


async def test_end_all_ends_every_stage_once() -> None:
    p, _ = pipeline(max_batch_size=1)
    preparing, waiting, running = (admit(p, i) for i in (1, 2, 3))
    for r in (running, waiting):
        p.queue(r, PreparedPrompt([1]))
    p.plan(asyncio.get_running_loop().time())
    assert (preparing.stage, waiting.stage, running.stage) == (PREPARING, WAITING, RUNNING)
    p.end_all("shutdown", RuntimeError("closing"))
    p.end_all("shutdown", RuntimeError("again"))
    assert counts(p) == (0, 0, 0, 0, 0) and p.stats.outcomes["shutdown"] == 3
    assert p.take_drops() == [3]  # only the running one is held by the backend
