"""The pipeline owns a request's life: one stage at a time, the counts read off the stages, every
end through one callback. Driven by hand here, with no engine, thread or backend."""

from __future__ import annotations

import asyncio
import itertools

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
        new_id=itertools.count(100).__next__,
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


async def test_a_failed_step_resumes_its_sequences_and_bisects_to_the_one_to_blame() -> None:
    p, _ = pipeline(token_budget=100)
    loop = asyncio.get_running_loop()
    reqs = [admit(p, i, max_tokens=4) for i in (1, 2, 3)]
    for r in reqs:
        p.queue(r, PreparedPrompt([1]))
    assert [n.seq_id for n in p.plan(loop.time())] == [1, 2, 3]
    p.deliver(StepResult([SeqOutput(i, (10 + i,), "x") for i in (1, 2, 3)]), loop.time())
    p.fail_step(RuntimeError("device lost"))
    # nobody failed: all three wait again under fresh ids, their old ids are dropped
    assert [r.stage for r in reqs] == [WAITING] * 3 and sorted(p.take_drops()) == [1, 2, 3]
    assert p.isolating and p.stats.step_splits == 1 and counts(p) == (0, 3, 0, 3, 3)
    # the first half (request 1) is probed alone, resumed from prompt + its token so far
    probe = p.plan(loop.time())
    assert [(tuple(n.prompt_ids), n.resumed, n.params.max_tokens) for n in probe] == [((1, 11), 1, 3)]
    assert probe[0].seq_id >= 100
    p.deliver(StepResult([SeqOutput(probe[0].seq_id, (21,), "y")]), loop.time())  # it passes
    # the second half (2 and 3) joins; that step raises: only the probed half is suspect
    second = p.plan(loop.time())
    assert [tuple(n.prompt_ids) for n in second] == [(1, 12), (1, 13)]
    p.fail_step(RuntimeError("bad again"))
    assert reqs[0].stage == WAITING, "a cleared request is not a suspect"
    p.plan(loop.time())  # probes request 2 alone
    assert [r.stage for r in reqs] == [WAITING, RUNNING, WAITING]
    p.fail_step(RuntimeError("bad at last"))
    assert reqs[1].outcome == "failed" and [r.stage for r in reqs] == [WAITING, DONE, WAITING]
    chunk = reqs[1].take_chunk()
    assert chunk is not None and chunk.token_ids == (12,)  # what it had is still delivered
    with pytest.raises(RequestFailed, match="bad at last"):
        reqs[1].take_chunk()
    # the rest of that half is probed, passes, then isolation is over and request 1 runs again
    last = p.plan(loop.time())
    assert [tuple(n.prompt_ids) for n in last] == [(1, 13)]
    p.deliver(StepResult([SeqOutput(last[0].seq_id, (31,), "z")]), loop.time())
    assert not p.isolating and [tuple(n.prompt_ids) for n in p.plan(loop.time())] == [(1, 11, 21)]
    assert p.stats.step_splits == 2 and p.stats.outcomes["failed"] == 1


async def test_out_of_memory_halves_the_batch_and_the_budget() -> None:
    p, _ = pipeline(token_budget=1000, max_batch_size=8)
    loop = asyncio.get_running_loop()
    reqs = [admit(p, i, max_tokens=4) for i in range(1, 9)]
    for r in reqs:
        p.queue(r, PreparedPrompt([1, 2]))
    assert len(p.plan(loop.time())) == 8
    p.fail_step(MemoryError("out of memory"))
    assert all(r.stage == WAITING for r in reqs) and not p.isolating
    assert p.batch_cap == 4 and p.token_budget == 8 * 6 // 2
    assert len(p.plan(loop.time())) == 4
    p.fail_step(type("OutOfMemoryError", (RuntimeError,), {})("CUDA out of memory"))  # torch's, by name
    assert p.batch_cap == 2 and p.stats.step_splits == 2
    assert len(p.plan(loop.time())) == 2


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
