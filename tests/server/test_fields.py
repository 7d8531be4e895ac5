"""The field table (supported / ignored / refused) against the official openai client, and every
400 counted as ``rejected`` (fake-model server)."""

from __future__ import annotations

import typing
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest
from batcher.adapters.server._fields import FIELDS
from openai.types import completion_create_params as completion_params
from openai.types.chat import completion_create_params as chat_params

from .conftest import Server, expected_text, metric

MESSAGES = [{"role": "user", "content": "hello there"}]

# A value that would change the output, for every refused field.
CHANGING: dict[str, Any] = {
    "best_of": 3,
    "echo": True,
    "suffix": "tail",
    "functions": [{"name": "f", "parameters": {}}],
    "function_call": "auto",
    "audio": {"voice": "alloy", "format": "wav"},
    "modalities": ["text", "audio"],
    "reasoning_effort": "low",
    "verbosity": "high",
    "web_search_options": {},
    "moderation": {"mode": "on"},
    "min_tokens": 4,
    "ignore_eos": True,
}


def refused(endpoint: str) -> list[str]:
    return sorted(n for n, r in FIELDS.items() if r.policy == "refused" and endpoint in r.endpoints)


@pytest.fixture
async def client(fake_server: Server) -> AsyncIterator[openai.AsyncOpenAI]:
    async with openai.AsyncOpenAI(base_url=fake_server.api, api_key="unused", max_retries=0) as c:
        yield c


def test_every_parameter_of_the_openai_client_has_an_entry() -> None:
    for params, endpoint in (
        (chat_params.CompletionCreateParamsBase, "chat"),
        (completion_params.CompletionCreateParamsBase, "completions"),
    ):
        names = set(typing.get_type_hints(params)) | {"stream"}
        missing = sorted(n for n in names if n not in FIELDS or endpoint not in FIELDS[n].endpoints)
        assert not missing, f"{endpoint}: decide supported/ignored/refused for {missing}"
    assert set(refused("chat")) | set(refused("completions")) == set(CHANGING)


@pytest.mark.parametrize("name", refused("chat"))
async def test_refused_chat_fields_are_400_naming_them(client: openai.AsyncOpenAI, name: str) -> None:
    with pytest.raises(openai.BadRequestError) as e:
        await client.chat.completions.create(
            model="fake", messages=MESSAGES, max_tokens=3, extra_body={name: CHANGING[name]}
        )
    assert e.value.param == name and name in e.value.message


@pytest.mark.parametrize("name", refused("completions"))
async def test_refused_completion_fields_are_400_naming_them(client: openai.AsyncOpenAI, name: str) -> None:
    with pytest.raises(openai.BadRequestError) as e:
        await client.completions.create(
            model="fake", prompt="p", max_tokens=3, extra_body={name: CHANGING[name]}
        )
    assert e.value.param == name and name in e.value.message


async def test_neutral_and_ignored_values_are_accepted_and_change_nothing(client: openai.AsyncOpenAI) -> None:
    neutral = {n: r.neutral[0] for n, r in FIELDS.items() if r.policy == "refused" and r.neutral}
    chat_extra = {n: v for n, v in neutral.items() if "chat" in FIELDS[n].endpoints}
    chat_extra |= {"user": "u-1", "metadata": {"k": "v"}, "store": False, "service_tier": "auto"}
    chat_extra |= {"parallel_tool_calls": True, "prompt_cache_key": "k", "safety_identifier": "s"}
    r = await client.chat.completions.create(
        model="fake", messages=MESSAGES, max_tokens=5, extra_body=chat_extra
    )
    assert r.choices[0].message.content == expected_text(MESSAGES, 5)
    completion_extra = {n: v for n, v in neutral.items() if "completions" in FIELDS[n].endpoints}
    r2 = await client.completions.create(
        model="fake", prompt="same text", max_tokens=5, user="u-2", extra_body=completion_extra
    )
    assert r2.choices[0].text == expected_text("same text", 5)


async def test_every_400_counts_as_rejected(fake_server: Server) -> None:
    chat = {"messages": MESSAGES}
    bad: list[tuple[str, Any]] = [
        ("/v1/completions", {"prompt": "x", "n": 65}),
        ("/v1/completions", {"prompt": "x", "max_tokens": "5"}),
        ("/v1/completions", b'{"prompt": "\\ud800"}'),
        ("/v1/completions", {"prompt": [1, -2]}),
        ("/v1/completions", {"prompt": "x", "temperature": 3}),
        ("/v1/completions", {"prompt": "REJECT me"}),  # refused by the backend: the core counts it
        ("/v1/chat/completions", chat | {"tools": [{"type": "function", "function": {"name": "f"}}]}),  # auto
        ("/v1/chat/completions", chat | {"surprise": 1}),
        ("/v1/chat/completions", {"messages": [{"role": "user", "content": 5}]}),
        ("/v1/chat/completions", b"{not json"),
        ("/v1/completions", {"model": "gpt-4o", "prompt": "x"}),  # 404 model_not_found
    ]
    async with httpx.AsyncClient(base_url=fake_server.url, timeout=10) as http:
        before = metric((await http.get("/metrics")).text, "batcher_requests_total", outcome="rejected")
        for path, body in bad:
            if isinstance(body, bytes):
                r = await http.post(path, content=body, headers={"content-type": "application/json"})
            else:
                r = await http.post(path, json=body)
            assert r.status_code in (400, 404), (body, r.text)
        ok = await http.post("/v1/completions", json={"prompt": "fine", "max_tokens": 2})
        assert ok.status_code == 200
        after = metric((await http.get("/metrics")).text, "batcher_requests_total", outcome="rejected")
    assert after - before == len(bad)


def test_docs_render_the_table() -> None:
    doc = (Path(__file__).resolve().parents[2] / "docs" / "server.md").read_text()
    rows = {
        line.split("|")[1].strip(" `"): line.split("|")[3].strip()
        for line in doc.splitlines()
        if line.startswith("| `")
    }
    assert {n: r.policy for n, r in FIELDS.items()}.items() <= rows.items()
