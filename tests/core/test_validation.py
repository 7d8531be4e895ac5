"""Bad input gets a clear error before admission, naming the field and the bad value."""

from __future__ import annotations

import math

import pytest

from batcher import BatchConfig, Batcher, InvalidRequest
from batcher.backend import SamplingParams
from batcher.testing import FakeBackend


@pytest.mark.parametrize(
    ("options", "field", "shown"),
    [
        ({"max_tokens": 0}, "max_tokens", "0"),
        ({"max_tokens": -5}, "max_tokens", "-5"),
        ({"max_tokens": 10**9}, "max_tokens", "1000000000"),
        ({"max_tokens": 2.5}, "max_tokens", "2.5"),
        ({"temperature": -1.0}, "temperature", "-1.0"),
        ({"temperature": math.nan}, "temperature", "nan"),
        ({"top_p": 0.0}, "top_p", "0.0"),
        ({"top_k": -1}, "top_k", "-1"),
        ({"seed": -3}, "seed", "-3"),
        ({"stop": [""]}, "stop", "''"),
        ({"deadline_s": -1.0}, "deadline_s", "-1.0"),
        ({"deadline_s": 0}, "deadline_s", "0"),
        ({"priority": "high"}, "priority", "high"),
        ({"colour": "blue"}, "colour", "colour"),
    ],
)
async def test_bad_options_are_refused_at_the_call(options: dict, field: str, shown: str) -> None:
    async with Batcher(FakeBackend()) as b:
        with pytest.raises(InvalidRequest) as info:
            b.stream("hello", **options)
        assert info.value.field == field
        assert shown in str(info.value)
        with pytest.raises(InvalidRequest):
            await b.generate("hello", **options)
        assert b.stats().outcomes["rejected"] == 2


@pytest.mark.parametrize(
    ("prompt", "field"),
    [
        ("", "prompt"),
        ([], "messages"),
        ([{"role": "user"}], "messages"),
        (42, "prompt"),
        (b"bytes", "prompt"),
        ("lone \ud800 surrogate", "prompt"),
        ([{"role": "user", "content": "bad \udfff"}], "messages"),
    ],
)
async def test_bad_prompts_are_refused(prompt: object, field: str) -> None:
    async with Batcher(FakeBackend()) as b:
        with pytest.raises(InvalidRequest) as info:
            b.stream(prompt)  # type: ignore[arg-type]
        assert info.value.field == field


async def test_prompt_beyond_context_fails_before_any_token() -> None:
    from batcher import PromptTooLong

    async with Batcher(FakeBackend(max_context=16)) as b:
        with pytest.raises(PromptTooLong) as info:
            async with b.stream("one two three four five", max_tokens=12):
                pass
        assert info.value.limit == 16 and info.value.requested == 17
        assert "16" in str(info.value)
        # a request that fits still runs
        assert (await b.generate("one two", max_tokens=3)).usage.completion_tokens == 3


async def test_request_larger_than_the_token_budget_is_refused() -> None:
    from batcher import PromptTooLong

    async with Batcher(FakeBackend(), BatchConfig(max_batch_tokens=20)) as b:
        with pytest.raises(PromptTooLong, match="budget of 20"):
            await b.generate("a b c", max_tokens=18)


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        ({"max_batch_size": 0}, "max_batch_size"),
        ({"max_queue": -1}, "max_queue"),
        ({"batch_window_s": -0.1}, "batch_window_s"),
        ({"batch_window_s": math.inf}, "batch_window_s"),
        ({"priority_aging_s": 0}, "priority_aging_s"),
        ({"max_batch_tokens": 0}, "max_batch_tokens"),
        ({"default_max_tokens": 10, "max_tokens_limit": 5}, "default_max_tokens"),
    ],
)
def test_config_is_validated(kwargs: dict, field: str) -> None:
    with pytest.raises(InvalidRequest) as info:
        BatchConfig(**kwargs)
    assert info.value.field == field and field in str(info.value)


def test_sampling_params_greedy_by_default() -> None:
    assert SamplingParams().greedy
    assert not SamplingParams(temperature=0.7).greedy
