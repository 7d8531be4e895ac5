"""OpenAI's response_format / tools / tool_choice bodies as a ResponseFormat, and 400s for the rest."""

from __future__ import annotations

import json
from typing import Any

import pytest
from batcher.adapters.server._structured import requested_format, tool_calls

from batcher import InvalidRequest
from batcher.backend import ResponseFormat

PARAMS = {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}
WEATHER = {"type": "function", "function": {"name": "get_weather", "parameters": PARAMS}}
TIME = {"type": "function", "function": {"name": "get_time", "description": "now"}}


def test_text_and_absent_formats_are_free_text() -> None:
    assert requested_format({}) is None
    assert requested_format({"response_format": {"type": "text"}}) is None
    assert requested_format({"tools": [WEATHER], "tool_choice": "none"}) is None


def test_json_object() -> None:
    assert requested_format({"response_format": {"type": "json_object"}}) == ResponseFormat.json_object()


def test_json_schema_keeps_the_schema_and_accepts_strict() -> None:
    schema = {"type": "object", "properties": {"b": {"type": "integer"}, "a": {"type": "string"}}}
    for strict in (True, False, None):
        body = {
            "response_format": {
                "type": "json_schema",
                "json_schema": {"name": "x", "schema": schema, "strict": strict},
            }
        }
        fmt = requested_format(body)
        assert fmt is not None and fmt.type == "json_schema"
        assert json.loads(fmt.schema) == schema and list(json.loads(fmt.schema)["properties"]) == ["b", "a"]


def test_required_forces_a_call_of_any_tool_and_a_named_choice_of_that_one() -> None:
    assert requested_format(
        {"tools": [WEATHER, TIME], "tool_choice": "required"}
    ) == ResponseFormat.tool_call([("get_weather", PARAMS), ("get_time", {})])
    named = {"type": "function", "function": {"name": "get_time"}}
    assert requested_format({"tools": [WEATHER, TIME], "tool_choice": named}) == ResponseFormat.tool_call(
        [("get_time", {})]
    )


@pytest.mark.parametrize(
    ("body", "field", "words"),
    [
        ({"response_format": {"type": "xml"}}, "response_format", "not supported"),
        ({"response_format": "json_object"}, "response_format", "must be an object"),
        ({"response_format": {"type": "json_schema"}}, "response_format", "needs"),
        (
            {"response_format": {"type": "json_schema", "json_schema": {"schema": {}}}},
            "response_format",
            "name",
        ),
        (
            {"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": [1]}}},
            "response_format",
            "JSON Schema object",
        ),
        (
            {
                "response_format": {
                    "type": "json_schema",
                    "json_schema": {"name": "x", "schema": {}, "strict": "yes"},
                }
            },
            "response_format",
            "strict",
        ),
        ({"tools": [WEATHER]}, "tool_choice", "cannot choose"),  # OpenAI's default: auto
        ({"tools": [WEATHER], "tool_choice": "auto"}, "tool_choice", "cannot choose"),
        ({"tool_choice": "required"}, "tool_choice", "needs tools"),
        (
            {"tools": [WEATHER], "tool_choice": {"type": "function", "function": {"name": "nope"}}},
            "tool_choice",
            "not among",
        ),
        ({"tools": [{"type": "code_interpreter"}], "tool_choice": "required"}, "tools", "only function"),
        ({"tools": [WEATHER, WEATHER], "tool_choice": "required"}, "tools", "twice"),
        (
            {"tools": [{"type": "function", "function": {"name": "a b"}}], "tool_choice": "required"},
            "tools",
            "letters",
        ),
        (
            {"tools": [WEATHER], "tool_choice": "required", "response_format": {"type": "json_object"}},
            "response_format",
            "both",
        ),
    ],
)
def test_what_cannot_be_honoured_is_a_400_naming_the_field(
    body: dict[str, Any], field: str, words: str
) -> None:
    with pytest.raises(InvalidRequest, match=words) as info:
        requested_format(body)
    assert info.value.field == field


def test_a_constrained_call_becomes_openais_tool_calls() -> None:
    (call,) = tool_calls('{"name": "get_weather", "arguments": {"city": "Oslo"}}')
    assert call["type"] == "function" and call["id"].startswith("call_")
    assert call["function"]["name"] == "get_weather"
    assert json.loads(call["function"]["arguments"]) == {"city": "Oslo"}  # a JSON string, as OpenAI sends
