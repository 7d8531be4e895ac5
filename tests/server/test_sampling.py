"""Penalties, logit bias and min-p through the official ``openai`` real_client, on the real SmolLM2."""

from __future__ import annotations

import openai
import pytest

pytestmark = [pytest.mark.model, pytest.mark.slow]

MODEL = "SmolLM2-135M-Instruct"
REPETITIVE = "I like apples. I like apples. I like apples. I like apples."


async def complete(real_client: openai.AsyncOpenAI, prompt: str, **kw: object) -> str:
    kw = {"max_tokens": 16} | kw
    r = await real_client.completions.create(model=MODEL, prompt=prompt, temperature=0, **kw)  # type: ignore[call-overload]
    return str(r.choices[0].text)


def distinct_ratio(text: str) -> float:
    words = text.split()
    return len(set(words)) / max(1, len(words))


async def test_penalties_change_a_repetitive_output(real_client: openai.AsyncOpenAI) -> None:
    plain = await complete(real_client, REPETITIVE)
    assert distinct_ratio(plain) < 0.5, plain  # the model keeps repeating itself
    for kw in (
        {"frequency_penalty": 2.0},
        {"presence_penalty": 2.0},
        {"extra_body": {"repetition_penalty": 2.0}},
    ):
        text = await complete(real_client, REPETITIVE, **kw)
        assert text != plain and distinct_ratio(text) > distinct_ratio(plain), (kw, text)


async def test_logit_bias_forces_a_token(real_client: openai.AsyncOpenAI) -> None:
    from batcher.adapters.hf._load import embedded_model_dir
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(embedded_model_dir()))
    [banana] = tok(" banana", add_special_tokens=False)["input_ids"]
    text = await complete(
        real_client, "The capital of France is", max_tokens=4, logit_bias={str(banana): 100}
    )
    assert text == " banana" * 4
    chat = await real_client.chat.completions.create(
        model=MODEL,
        messages=[{"role": "user", "content": "Say hello."}],
        max_tokens=3,
        temperature=0.9,
        logit_bias={str(banana): 100},
    )
    assert chat.choices[0].message.content == " banana" * 3


async def test_min_p_one_is_greedy_at_any_temperature(real_client: openai.AsyncOpenAI) -> None:
    prompt = "Once upon a time, in a small village,"
    greedy = await complete(real_client, prompt)
    r = await real_client.completions.create(
        model=MODEL, prompt=prompt, max_tokens=16, temperature=1.5, extra_body={"min_p": 1.0}
    )
    assert r.choices[0].text == greedy


async def test_out_of_range_penalties_are_400_naming_the_field(real_client: openai.AsyncOpenAI) -> None:
    for name, value in (
        ("presence_penalty", 3),
        ("frequency_penalty", -2.5),
        ("logit_bias", {"5": 200}),
        ("logit_bias", {"999999": 1}),
    ):
        with pytest.raises(openai.BadRequestError) as e:
            await complete(real_client, "x", **{name: value})
        assert name in e.value.message
