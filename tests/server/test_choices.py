"""logprobs, token-id prompts and ``n`` through the official openai client, on the fake-model
server (whose distribution is known: the generated token 1/2, the next ids 1/4, 1/8...)."""

from __future__ import annotations

import math
from collections.abc import AsyncIterator

import openai
import pytest
from batcher.adapters.server._generate import choice_seed

from batcher import TokenIds
from batcher.backend import SamplingParams
from batcher.testing import FakeBackend

from .conftest import Server, expected_text, streamed_logprobs

MESSAGES = [{"role": "user", "content": "tell me something"}]


@pytest.fixture
async def client(fake_server: Server) -> AsyncIterator[openai.AsyncOpenAI]:
    async with openai.AsyncOpenAI(base_url=fake_server.api, api_key="unused", max_retries=0) as c:
        yield c


async def test_chat_logprobs_streamed_and_not_are_the_same_sorted_lists(client: openai.AsyncOpenAI) -> None:
    r = await client.chat.completions.create(
        model="fake",
        messages=MESSAGES,
        max_tokens=5,
        logprobs=True,
        top_logprobs=3,  # type: ignore[arg-type]
    )
    content = r.choices[0].logprobs.content  # type: ignore[union-attr]
    assert content is not None and len(content) == r.usage.completion_tokens == 5  # type: ignore[union-attr]
    assert "".join(t.token for t in content) == r.choices[0].message.content
    for t in content:
        assert t.logprob == pytest.approx(-math.log(2)) and bytes(t.bytes or []).decode() == t.token
        assert [a.logprob for a in t.top_logprobs] == sorted(
            (a.logprob for a in t.top_logprobs), reverse=True
        )
        assert len(t.top_logprobs) == 3 and t.top_logprobs[0].token == t.token
    stream = await client.chat.completions.create(
        model="fake",
        messages=MESSAGES,
        max_tokens=5,
        logprobs=True,
        top_logprobs=3,
        stream=True,  # type: ignore[arg-type]
    )
    streamed = await streamed_logprobs(stream)
    assert [t.model_dump() for t in streamed] == [t.model_dump() for t in content]
    plain = await client.chat.completions.create(model="fake", messages=MESSAGES, max_tokens=2)
    assert plain.choices[0].logprobs is None


async def test_completion_logprobs_have_the_legacy_shape(client: openai.AsyncOpenAI) -> None:
    r = await client.completions.create(model="fake", prompt="legacy shape", max_tokens=4, logprobs=2)
    lp = r.choices[0].logprobs
    assert lp is not None and lp.tokens is not None and lp.top_logprobs is not None
    assert "".join(lp.tokens) == r.choices[0].text == expected_text("legacy shape", 4)
    assert lp.token_logprobs == pytest.approx([-math.log(2)] * 4)
    assert lp.text_offset == [sum(len(t) for t in lp.tokens[:i]) for i in range(4)]
    for token, top in zip(lp.tokens, lp.top_logprobs, strict=True):
        assert len(top) == 2 and max(top, key=top.__getitem__) == token  # the chosen is the top one here
    stream = await client.completions.create(
        model="fake", prompt="legacy shape", max_tokens=4, logprobs=2, stream=True
    )
    offsets = [
        o async for c in stream if c.choices[0].logprobs for o in c.choices[0].logprobs.text_offset or ()
    ]
    assert offsets == lp.text_offset


async def test_token_id_prompts_and_lists_of_them(client: openai.AsyncOpenAI) -> None:
    fake = FakeBackend()

    def expect(ids: tuple[int, ...]) -> str:
        return "".join(
            fake.token_text(t) for t in fake.expected_tokens(TokenIds(ids), SamplingParams(max_tokens=3))
        )

    r = await client.completions.create(model="fake", prompt=[5, 6, 7], max_tokens=3)
    assert r.choices[0].text == expect((5, 6, 7)) and r.usage.prompt_tokens == 3  # type: ignore[union-attr]
    r2 = await client.completions.create(model="fake", prompt=[[5, 6, 7], [8, 9]], max_tokens=3)
    assert [c.text for c in r2.choices] == [expect((5, 6, 7)), expect((8, 9))]
    assert r2.usage.prompt_tokens == 5  # type: ignore[union-attr]


async def test_n_choices_with_derived_seeds_and_usage_counting_each_prompt_once(
    client: openai.AsyncOpenAI,
) -> None:
    fake = FakeBackend()
    r = await client.completions.create(
        model="fake", prompt=["one prompt", "two prompts"], max_tokens=4, temperature=0.8, seed=9, n=3
    )
    assert [c.index for c in r.choices] == list(range(6))
    for i, prompt in enumerate(["one prompt", "two prompts"]):
        for j in range(3):
            params = SamplingParams(max_tokens=4, temperature=0.8, seed=choice_seed(9, j))
            ids = fake.expected_tokens(prompt, params)
            assert r.choices[i * 3 + j].text == "".join(fake.token_text(t) for t in ids)
    assert len({c.text for c in r.choices}) == 6
    assert r.usage.prompt_tokens == 4 and r.usage.completion_tokens == 24  # type: ignore[union-attr]
    stream = await client.chat.completions.create(
        model="fake",
        messages=MESSAGES,
        max_tokens=3,
        n=2,
        stream=True,
        stream_options={"include_usage": True},
    )
    texts = ["", ""]
    usage = None
    async for c in stream:
        for choice in c.choices:
            texts[choice.index] += choice.delta.content or ""
        usage = c.usage or usage
    assert texts == [expected_text(MESSAGES, 3)] * 2  # unseeded fake sampling: the same tokens
    assert usage is not None and usage.completion_tokens == 6 and usage.prompt_tokens == 4
