"""ResponseFormat: the torch-free description of a structured output (JSON, a schema, a tool call)."""

from __future__ import annotations

import json
from typing import Any

import pytest

from batcher import InvalidRequest
from batcher.backend import ResponseFormat


@pytest.mark.parametrize(
    ("kind", "schema", "words"),
    [
        ("xml", "", "json_object"),
        ("json_object", '{"type": "object"}', "takes no schema"),
        ("json_schema", "{not json", "not valid JSON"),
        ("json_schema", "[1, 2]", "must be a JSON object"),
    ],
)
def test_a_malformed_format_is_refused_on_construction(kind: Any, schema: str, words: str) -> None:
    with pytest.raises(InvalidRequest, match=words):
        ResponseFormat(kind, schema)


def test_schema_key_order_is_kept() -> None:
    fmt = ResponseFormat.json_schema({"type": "object", "properties": {"z": {}, "a": {}}})
    assert list(json.loads(fmt.schema)["properties"]) == ["z", "a"]


def test_no_tools_is_refused() -> None:
    with pytest.raises(InvalidRequest, match="at least one") as info:
        ResponseFormat.tool_call([])
    assert info.value.field == "tools"


def test_one_tool_is_its_call_and_several_are_any_of_theirs() -> None:
    params = {"type": "object", "properties": {"city": {"type": "string"}}}
    one = json.loads(ResponseFormat.tool_call([("get_weather", params)]).schema)
    assert one["properties"] == {"name": {"const": "get_weather"}, "arguments": params}
    assert one["required"] == ["name", "arguments"] and one["additionalProperties"] is False
    two = json.loads(ResponseFormat.tool_call([("a", params), ("b", {})]).schema)
    names = [c["properties"]["name"]["const"] for c in two["anyOf"]]
    assert names == ["a", "b"]
    assert two["anyOf"][1]["properties"]["arguments"] == {"type": "object"}  # no parameters: any object
