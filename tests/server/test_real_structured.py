"""Structured output on the real SmolLM2 (float32) through the official openai real_client: JSON mode,
JSON schemas, forced tool calls (whole and streamed), and the 400s for what is not supported."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from typing import Any

import openai
import pytest

pytestmark = [pytest.mark.model, pytest.mark.slow]
jsonschema = pytest.importorskip("jsonschema")
pytest.importorskip("llguidance")
MODEL = "SmolLM2-135M-Instruct"
CASES = json.loads((Path(__file__).parents[1] / "structured_cases.json").read_text())
SYSTEM: str = CASES["system"]
OBJECT_PROMPTS: list[str] = CASES["object_prompts"]
PERSON: dict[str, Any] = CASES["person"]
TOOLS: dict[str, dict[str, Any]] = CASES["tools"]
TOOL_SYSTEM = "You call one of the tools get_weather(city, unit) and get_time(timezone), as JSON."
FUNCTIONS: list[Any] = [
    {"type": "function", "function": {"name": name, "parameters": params}} for name, params in TOOLS.items()
]


def chat(user: str, system: str = SYSTEM) -> list[Any]:
    return [{"role": "system", "content": system}, {"role": "user", "content": user}]


async def test_json_object_output_parses_for_20_prompts(real_client: openai.AsyncOpenAI) -> None:
    async def ask(prompt: str) -> tuple[str, str]:
        r = await real_client.chat.completions.create(
            model=MODEL,
            messages=chat(prompt),
            max_tokens=80,
            temperature=0,
            response_format={"type": "json_object"},
        )
        return r.choices[0].message.content or "", r.choices[0].finish_reason

    answers = await asyncio.gather(*(ask(p) for p in OBJECT_PROMPTS))  # batched together
    for prompt, (text, finish) in zip(OBJECT_PROMPTS, answers, strict=True):
        assert finish == "stop", (prompt, text)
        assert isinstance(json.loads(text), dict), (prompt, text)
    assert len({text for text, _ in answers}) >= 15


async def test_a_streamed_json_object_parses(real_client: openai.AsyncOpenAI) -> None:
    stream = await real_client.chat.completions.create(
        model=MODEL,
        messages=chat(OBJECT_PROMPTS[1]),
        max_tokens=80,
        temperature=0,
        response_format={"type": "json_object"},
        stream=True,
    )
    parts, finish = [], None
    async for chunk in stream:
        if chunk.choices:
            parts.append(chunk.choices[0].delta.content or "")
            finish = chunk.choices[0].finish_reason or finish
    assert finish == "stop" and isinstance(json.loads("".join(parts)), dict)


@pytest.mark.parametrize("strict", [True, False])
async def test_json_schema_output_validates(real_client: openai.AsyncOpenAI, strict: bool) -> None:
    users = [
        "Invent a person who lives in Paris.",
        "A young footballer from London, please.",
        "Describe yourself.",
    ]
    fmt: Any = {"type": "json_schema", "json_schema": {"name": "person", "schema": PERSON, "strict": strict}}
    rs = await asyncio.gather(
        *(
            real_client.chat.completions.create(
                model=MODEL,
                messages=chat(u),
                max_tokens=120,
                temperature=0.7,
                seed=i,
                response_format=fmt,
            )
            for i, u in enumerate(users)
        )
    )
    for r in rs:
        assert r.choices[0].finish_reason == "stop", r
        jsonschema.validate(json.loads(r.choices[0].message.content or ""), PERSON)


async def test_a_required_tool_call_comes_back_as_tool_calls(real_client: openai.AsyncOpenAI) -> None:
    r = await real_client.chat.completions.create(
        model=MODEL,
        messages=chat("What's the weather like in Berlin?", TOOL_SYSTEM),
        max_tokens=80,
        temperature=0,
        tools=FUNCTIONS,
        tool_choice="required",
    )
    choice = r.choices[0]
    assert choice.finish_reason == "tool_calls" and choice.message.content is None
    (call,) = choice.message.tool_calls or []
    assert call.type == "function" and call.id.startswith("call_")
    assert call.function.name in TOOLS  # type: ignore[union-attr]
    jsonschema.validate(json.loads(call.function.arguments), TOOLS[call.function.name])  # type: ignore[union-attr]


async def test_a_named_tool_choice_forces_that_function_when_streamed(
    real_client: openai.AsyncOpenAI,
) -> None:
    stream = await real_client.chat.completions.create(
        model=MODEL,
        messages=chat("What's the weather like in Berlin?", TOOL_SYSTEM),
        max_tokens=80,
        temperature=0,
        tools=FUNCTIONS,
        tool_choice={"type": "function", "function": {"name": "get_time"}},
        stream=True,
    )
    name, arguments, finish = "", "", None
    async for chunk in stream:
        if not chunk.choices:
            continue
        for delta in chunk.choices[0].delta.tool_calls or []:  # accumulated as OpenAI's clients do
            assert delta.index == 0
            name += delta.function.name or "" if delta.function else ""
            arguments += delta.function.arguments or "" if delta.function else ""
        finish = chunk.choices[0].finish_reason or finish
    assert finish == "tool_calls" and name == "get_time"
    jsonschema.validate(json.loads(arguments), TOOLS["get_time"])


@pytest.mark.parametrize(
    ("extra", "param"),
    [
        (
            {
                "response_format": {
                    "type": "json_schema",
                    "json_schema": {"name": "s", "schema": {"format": "x"}},
                }
            },
            "response_format",
        ),
        (
            {
                "response_format": {
                    "type": "json_schema",
                    "json_schema": {"name": "s", "schema": {"type": "objekt"}},
                }
            },
            "response_format",
        ),
        ({"tools": FUNCTIONS}, "tool_choice"),  # OpenAI's default, auto: the model cannot choose here
        ({"tools": FUNCTIONS, "tool_choice": "auto"}, "tool_choice"),
    ],
)
async def test_what_cannot_be_honoured_is_a_400(
    real_client: openai.AsyncOpenAI, extra: dict[str, Any], param: str
) -> None:
    with pytest.raises(openai.BadRequestError) as e:
        await real_client.chat.completions.create(
            model=MODEL, messages=chat("Hi"), max_tokens=5, extra_body=extra
        )
    assert e.value.param == param
