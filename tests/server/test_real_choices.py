"""logprobs, token-id prompts and ``n`` on the real SmolLM2 (float32) through the openai real_client."""

from __future__ import annotations

import asyncio
import math

import httpx
import openai
import pytest

from .conftest import Server, metric, streamed_logprobs

pytestmark = pytest.mark.model
MODEL = "SmolLM2-135M-Instruct"
STORY = [{"role": "user", "content": "Write a short poem about the sea and a ship."}]


async def test_greedy_chat_logprobs_choose_the_top_token_and_sum_sensibly(
    real_client: openai.AsyncOpenAI,
) -> None:
    r = await real_client.chat.completions.create(
        model=MODEL,
        messages=STORY,
        max_tokens=12,
        temperature=0,
        logprobs=True,
        top_logprobs=5,  # type: ignore[arg-type]
    )
    content = r.choices[0].logprobs.content  # type: ignore[union-attr]
    assert content is not None and len(content) == r.usage.completion_tokens  # type: ignore[union-attr]
    total = sum(t.logprob for t in content)
    assert math.isfinite(total) and total <= 0
    for t in content:
        tops = t.top_logprobs
        assert len(tops) == 5 and tops[0].token == t.token and tops[0].logprob == t.logprob
        assert [a.logprob for a in tops] == sorted((a.logprob for a in tops), reverse=True)
    assert b"".join(bytes(t.bytes or []) for t in content).decode() == r.choices[0].message.content
    stream = await real_client.chat.completions.create(
        model=MODEL,
        messages=STORY,
        max_tokens=12,
        temperature=0,
        logprobs=True,
        top_logprobs=5,
        stream=True,  # type: ignore[arg-type]
    )
    streamed = await streamed_logprobs(stream)
    assert [t.token for t in streamed] == [t.token for t in content]
    assert [t.logprob for t in streamed] == pytest.approx([t.logprob for t in content], abs=1e-4)


async def test_completion_logprobs_sampled_tokens_are_not_always_the_top(
    real_client: openai.AsyncOpenAI,
) -> None:
    r = await real_client.completions.create(
        model=MODEL, prompt="Once upon a time", max_tokens=16, temperature=1.5, seed=5, logprobs=3
    )
    lp = r.choices[0].logprobs
    assert lp is not None and lp.token_logprobs is not None and lp.top_logprobs is not None
    assert len(lp.token_logprobs) == r.usage.completion_tokens  # type: ignore[union-attr]
    assert all(x <= 0 and math.isfinite(x) for x in lp.token_logprobs)
    for chosen, top in zip(lp.token_logprobs, lp.top_logprobs, strict=True):
        assert 3 <= len(top) <= 4 and chosen in top.values()  # up to logprobs + 1: the chosen one too
        assert max(top.values()) >= chosen


async def test_token_id_prompts_generate_as_their_text_does(real_client: openai.AsyncOpenAI) -> None:
    from batcher.adapters.hf._load import embedded_model_dir
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(embedded_model_dir()))
    texts = ["The capital of France is", "Water boils at"]
    ids = [tok(t)["input_ids"] for t in texts]
    by_text = await real_client.completions.create(model=MODEL, prompt=texts, max_tokens=8, temperature=0)
    by_ids = await real_client.completions.create(model=MODEL, prompt=ids, max_tokens=8, temperature=0)
    assert [c.text for c in by_ids.choices] == [c.text for c in by_text.choices]
    assert by_ids.usage == by_text.usage
    with pytest.raises(openai.BadRequestError, match="vocabulary"):
        await real_client.completions.create(model=MODEL, prompt=[1, len(tok) + 5], max_tokens=2)


@pytest.mark.parametrize("stream", [False, True])
async def test_n_2_differs_when_sampling_and_not_at_temperature_0(
    real_client: openai.AsyncOpenAI, stream: bool
) -> None:
    async def chat(temperature: float) -> list[str]:
        kw = dict(model=MODEL, messages=STORY, max_tokens=16, temperature=temperature, seed=1234, n=2)
        if not stream:
            r = await real_client.chat.completions.create(**kw)  # type: ignore[call-overload]
            assert [c.index for c in r.choices] == [0, 1]
            return [c.message.content or "" for c in r.choices]
        texts = ["", ""]
        async for c in await real_client.chat.completions.create(stream=True, **kw):  # type: ignore[call-overload]
            for ch in c.choices:
                texts[ch.index] += ch.delta.content or ""
        return texts

    hot = await chat(0.8)
    assert hot[0] != hot[1] and all(hot)
    assert await chat(0.8) == hot  # each choice's derived seed reproduces it
    cold = await chat(0.0)
    assert cold[0] == cold[1]
    r = await real_client.completions.create(
        model=MODEL, prompt="Once upon a time", max_tokens=8, n=2, temperature=0
    )
    assert r.choices[0].text == r.choices[1].text


async def test_n_copies_are_served_from_the_prefix_cache(
    real_client: openai.AsyncOpenAI, real_server: Server
) -> None:
    """The server admits the copies after the first one's first token: its prompt is cached then."""
    prompt = "A long unrepeated preamble about lighthouses, their keepers and storms. " * 6 + "Go on:"
    async with httpx.AsyncClient(base_url=real_server.url) as http:
        before = metric((await http.get("/metrics")).text, "batcher_cached_tokens_total")
        r = await real_client.completions.create(model=MODEL, prompt=prompt, max_tokens=2, n=4, temperature=0)
        after = metric((await http.get("/metrics")).text, "batcher_cached_tokens_total")
        # the control: four identical new prompts sent at once, as four requests
        other = prompt.replace("lighthouses", "windmills")
        await asyncio.gather(
            *(
                real_client.completions.create(model=MODEL, prompt=other, max_tokens=2, temperature=0)
                for _ in range(4)
            )
        )
        control = metric((await http.get("/metrics")).text, "batcher_cached_tokens_total") - after
    tokens = r.usage.prompt_tokens  # type: ignore[union-attr]
    print(
        f"\n{tokens}-token prompt: n=4 served {after - before:.0f} prompt tokens from the cache; "
        f"4 concurrent requests of a prompt as long: {control:.0f}"
    )
    assert after - before >= 3 * (tokens - 8)  # each copy: all but the last partial 8-token block
