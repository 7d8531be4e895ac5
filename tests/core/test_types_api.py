"""Logprobs and token-id prompts through the core, on the shipped FakeBackend: validation, the
per-token lists that follow the tokens, and their concatenation when a lagging consumer's deltas
are merged into one chunk."""

from __future__ import annotations

import asyncio
import math

import pytest

from batcher import BatchConfig, Batcher, InvalidRequest, TokenIds
from batcher.backend import SamplingParams
from batcher.testing import FakeBackend

FAST = BatchConfig(batch_window_s=0.0)


def test_logprobs_and_token_ids_are_validated() -> None:
    assert SamplingParams(logprobs=0).logprobs == 0
    for bad in (-1, 21, True, 1.5):
        with pytest.raises(InvalidRequest, match="logprobs"):
            SamplingParams(logprobs=bad)  # type: ignore[arg-type]
    assert TokenIds((1, 2)).ids == (1, 2)
    for ids in ((), (1, -2), (1, True), [1, 2]):
        with pytest.raises(InvalidRequest) as e:
            TokenIds(ids)  # type: ignore[arg-type]
        assert e.value.field == "prompt"


async def test_each_token_gets_its_logprobs_with_k_alternatives() -> None:
    fb = FakeBackend(step_time_s=0.003)
    async with Batcher(fb, FAST) as b:
        chunks = [c async for c in b.stream("hello there", max_tokens=4, logprobs=3)]
        plain = await b.generate("hello there", max_tokens=4)
    assert plain.logprobs == ()
    ids = [i for c in chunks for i in c.token_ids]
    entries = [e for c in chunks for e in c.logprobs]
    assert [e.chosen.token_id for e in entries] == ids
    for c in chunks:
        assert len(c.logprobs) == len(c.token_ids)
    for e in entries:
        assert [t.logprob for t in e.top] == sorted((t.logprob for t in e.top), reverse=True)
        assert len(e.top) == 3 and e.top[0] == e.chosen and e.chosen.logprob == -math.log(2)


async def test_a_lagging_consumer_gets_the_merged_tokens_logprobs_concatenated() -> None:
    fb = FakeBackend(step_time_s=0.002)
    async with Batcher(fb, FAST) as b:
        async with b.stream("slow reader", max_tokens=6, logprobs=1) as s:
            async with asyncio.timeout(5):
                while s.outcome is None:  # read nothing until all six tokens piled up
                    await asyncio.sleep(0.005)
            chunks = [c async for c in s]
        whole = await b.generate("slow reader", max_tokens=6, logprobs=1)
    assert len(chunks) == 1 and len(chunks[0].token_ids) == 6
    assert [e.chosen.token_id for e in chunks[0].logprobs] == list(chunks[0].token_ids)
    assert chunks[0].logprobs == whole.logprobs and whole.token_ids == chunks[0].token_ids


async def test_a_token_id_prompt_is_prefilled_as_given() -> None:
    fb = FakeBackend()
    async with Batcher(fb, FAST) as b:
        got = await b.generate(TokenIds((5, 6, 7)), max_tokens=3)
        with pytest.raises(InvalidRequest, match="TokenIds"):
            await b.generate([5, 6, 7], max_tokens=3)  # type: ignore[arg-type]
    assert got.usage.prompt_tokens == 3
    assert list(got.token_ids) == fb.expected_tokens(TokenIds((5, 6, 7)), SamplingParams(max_tokens=3))
