"""``HFBackend.interrupt``: a decode step stopped between layers (a newcomer waits) produces nothing
and changes nothing, so the step that redoes it gives the same tokens: on the tiny random Llama,
and on the real SmolLM2 in float32 against plain transformers' solo ``generate``. Where stopping
does not pay (late in the step, many rows), and in a step that admits, the call is ignored."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import pytest
from batcher.adapters.hf._backend import HFBackend

from batcher import BatchConfig, Batcher
from batcher.backend import NewSequence

from .conftest import greedy, run_schedule, solo_greedy


@contextmanager
def interrupting(backend: HFBackend, layer: int, every: int = 2) -> Iterator[list[int]]:
    """Call ``backend.interrupt()`` just before ``layer`` runs, in every ``every``-th forward call
    (so that the step redoing a stopped one runs whole). Yields the list of calls made."""
    calls: list[int] = []
    seen = 0

    def hook(module: Any, args: Any) -> None:
        nonlocal seen
        if seen % every == 0:
            calls.append(seen)
            backend.interrupt()
        seen += 1

    handle = backend.model.model.layers[layer].register_forward_pre_hook(hook)
    try:
        yield calls
    finally:
        handle.remove()


def prompts(backend: HFBackend) -> list[list[int]]:
    texts = ["The capital of France is", "Once upon a time", "1, 2, 3, 4,", "Dear diary, today"]
    return [backend.tokenize(t) for t in texts]


def test_stopped_steps_change_nothing_on_the_tiny_model(tiny: HFBackend) -> None:
    ids = prompts(tiny)
    schedule = {0: [NewSequence(0, ids[0], greedy(12))], 3: [NewSequence(1, ids[1], greedy(9))]}
    schedule[7] = [NewSequence(2, ids[2], greedy(6))]
    with interrupting(tiny, layer=1) as calls:  # 2 layers: stopped after layer 0 wrote keys/values
        got, steps = run_schedule(tiny, schedule)
    stopped = [s for s in steps if s.interrupted]
    assert stopped and calls
    assert all(not s.outputs and s.computed_tokens == 0 for s in stopped)
    for i, seq in enumerate((0, 1, 2)):
        want = solo_greedy(tiny, ids[i], (12, 9, 6)[i])
        assert got[seq].tokens == want, (seq, got[seq].tokens, want)


def test_interrupt_is_ignored_when_the_step_admits_or_it_does_not_pay(tiny: HFBackend) -> None:
    ids = prompts(tiny)
    tiny.interrupt()  # set before a step that admits: that step runs whole
    first = tiny.step([NewSequence(10 + i, p, greedy(8)) for i, p in enumerate(ids)], ())
    assert not first.interrupted and len(first.outputs) == 4
    # 4 rows, stopped before layer 1 of 2: (2 - 1) * 4 > 1 * 4 is false, so the step runs whole
    with interrupting(tiny, layer=1, every=1) as calls:
        late = tiny.step((), ())
    assert calls and not late.interrupted and len(late.outputs) == 4
    # The event does not outlive the step: the next one runs whole without a new call
    assert not tiny.step((), ()).interrupted
    tiny.interrupt()  # before layer 0, stopping always pays: nothing was computed yet
    early = tiny.step((), ())
    assert early.interrupted and not early.outputs
    tiny.step((), (10, 11, 12, 13))


@pytest.mark.model
@pytest.mark.slow
def test_stopped_steps_keep_fp32_smollm2_equal_to_solo_generate(smol: HFBackend, smol_plain: object) -> None:
    """30 layers, up to 3 rows: stopped before layer 10, after 10 layers of keys/values were written
    at the column the redo writes again. Every sequence still equals plain transformers' output."""
    ids = prompts(smol)
    schedule = {
        0: [NewSequence(0, ids[0], greedy(14))],
        2: [NewSequence(1, ids[1], greedy(10))],
        5: [NewSequence(2, ids[2], greedy(8))],
    }
    with interrupting(smol, layer=10) as calls:
        got, steps = run_schedule(smol, schedule)
    assert calls and sum(s.interrupted for s in steps) >= 5
    for i, n in enumerate((14, 10, 8)):
        assert got[i].tokens == solo_greedy(smol, ids[i], n, model=smol_plain), i


@pytest.mark.model
@pytest.mark.slow
async def test_newcomers_interrupt_real_decode_steps_through_the_batcher(smol_plain: object) -> None:
    """The real threads: the loop calls ``interrupt`` while the device thread runs SmolLM2's
    forward. Six newcomers arrive, each two decode steps after the last (a stop pays in the first
    ~24 of 30 layers with one or two rows, so at least one of six lands there); every output still
    equals solo ``generate``."""
    backend = HFBackend(dtype="float32")  # the Batcher starts and closes its own
    texts = ["Write a long story about a lighthouse keeper.", *(f"Count to {i}:" for i in range(3, 9))]
    async with Batcher(backend, BatchConfig(max_batch_size=8)) as b:
        ids = [backend.tokenize(t) for t in texts]

        async def one(i: int, max_tokens: int) -> list[int]:
            tokens: list[int] = []
            async with b.stream(texts[i], max_tokens=max_tokens) as stream:
                async for chunk in stream:
                    tokens += chunk.token_ids
            return tokens

        story = asyncio.create_task(one(0, 60))
        others = []
        for i in range(1, len(texts)):
            await asyncio.sleep(0.13)
            others.append(asyncio.create_task(one(i, 6)))
        got = [await story, *[await t for t in others]]
        stats = b.engine_stats()[0].stats
    assert stats.interrupted_steps >= 1
    for i, tokens in enumerate(got):
        assert tokens == solo_greedy(backend, ids[i], 60 if i == 0 else 6, model=smol_plain), i
