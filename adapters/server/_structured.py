"""OpenAI's ``response_format``, ``tools`` and ``tool_choice`` as a :class:`ResponseFormat`, and a
constrained tool call's text back as OpenAI's ``tool_calls``.

Pure functions over the parsed JSON body; every request the backend could not honour is an
:class:`~batcher.InvalidRequest` naming its field (a 400):

* ``response_format``: ``text`` (or absent) is free text; ``json_object`` any JSON object;
  ``json_schema`` an instance of ``json_schema.schema``. ``strict`` is accepted either way: the
  output always follows the schema (constrained decoding is strict by construction).
* ``tools`` (functions only) with ``tool_choice`` ``"required"`` (a call of one of them) or
  ``{"type": "function", "function": {"name": ...}}`` (a call of that one); ``"none"`` is free
  text. ``"auto"`` (OpenAI's default when tools are sent) is refused: letting the model choose
  between text and a call needs a tool-call format the model was trained on, which SmolLM2 lacks;
  constrained decoding can only force the call.
* The model's call comes out as ``{"name": ..., "arguments": {...}}`` (``ResponseFormat.tool_call``);
  :func:`tool_calls` turns it into OpenAI's ``message.tool_calls``.
"""

from __future__ import annotations

import json
import re
import uuid
from collections.abc import Mapping, Sequence
from typing import Any

from batcher import InvalidRequest
from batcher.backend import ResponseFormat

__all__ = ["requested_format", "tool_calls"]

_NAME = re.compile(r"^[A-Za-z0-9_-]{1,64}$")  # OpenAI's rule for function and schema names


def requested_format(body: Mapping[str, Any]) -> ResponseFormat | None:
    """The format a chat request's body asks for (``None``: free text)."""
    fmt = _response_format(body.get("response_format"))
    tools = _forced_tools(body.get("tools"), body.get("tool_choice"))
    if fmt is not None and tools is not None:
        raise InvalidRequest(
            "response_format and a forced tool call cannot both shape one answer: send one of them",
            field="response_format",
        )
    return fmt or tools


def tool_calls(text: str) -> list[dict[str, Any]]:
    """OpenAI's ``tool_calls`` for the text a ``ResponseFormat.tool_call`` produced."""
    call = json.loads(text)
    return [
        {
            "id": f"call_{uuid.uuid4().hex[:24]}",
            "type": "function",
            "function": {"name": call["name"], "arguments": json.dumps(call["arguments"])},
        }
    ]


def _response_format(value: Any) -> ResponseFormat | None:
    if value is None:
        return None
    if not isinstance(value, Mapping) or not isinstance(value.get("type"), str):
        raise InvalidRequest(
            'response_format must be an object with a "type": "text", "json_object" or "json_schema"',
            field="response_format",
        )
    kind = value["type"]
    if kind == "text":
        return None
    if kind == "json_object":
        return ResponseFormat.json_object()
    if kind == "json_schema":
        return ResponseFormat.json_schema(_schema(value.get("json_schema")))
    raise InvalidRequest(
        f'response_format type {kind!r} is not supported: use "text", "json_object" or "json_schema"',
        field="response_format",
    )


def _schema(spec: Any) -> Mapping[str, Any]:
    """``response_format.json_schema``: ``name`` (required, as OpenAI requires), ``schema``,
    optional ``description`` and ``strict``."""
    if not isinstance(spec, Mapping):
        raise InvalidRequest(
            'a json_schema response_format needs "json_schema": {"name": ..., "schema": {...}}',
            field="response_format",
        )
    name = spec.get("name")
    if not isinstance(name, str) or not _NAME.match(name):
        raise InvalidRequest(
            "response_format.json_schema.name must be 1-64 letters, digits, '_' or '-'",
            field="response_format",
        )
    schema = spec.get("schema")
    if not isinstance(schema, Mapping):
        raise InvalidRequest(
            "response_format.json_schema.schema must be a JSON Schema object", field="response_format"
        )
    if not isinstance(spec.get("strict", False), (bool, type(None))):
        raise InvalidRequest("response_format.json_schema.strict must be a boolean", field="response_format")
    return schema


def _forced_tools(tools: Any, choice: Any) -> ResponseFormat | None:
    if not tools:
        if choice not in (None, "none"):
            raise InvalidRequest(
                "tool_choice needs tools: send the tools to choose from", field="tool_choice"
            )
        return None
    functions = _functions(tools)
    if choice == "none":
        return None
    if choice == "required":
        return ResponseFormat.tool_call(functions)
    if isinstance(choice, Mapping) and choice.get("type") == "function":
        name = choice.get("function", {}).get("name") if isinstance(choice.get("function"), Mapping) else None
        chosen = [f for f in functions if f[0] == name]
        if not chosen:
            raise InvalidRequest(
                f"tool_choice names function {name!r}, which is not among the tools", field="tool_choice"
            )
        return ResponseFormat.tool_call(chosen)
    raise InvalidRequest(
        f"tool_choice {json.dumps(choice)} is not supported: the model cannot choose between an answer "
        'and a call here; send "required" (a call of one of the tools), '
        '{"type": "function", "function": {"name": ...}} or "none"',
        field="tool_choice",
    )


def _functions(tools: Any) -> Sequence[tuple[str, Mapping[str, Any]]]:
    if not isinstance(tools, list):
        raise InvalidRequest("tools must be a list of function tools", field="tools")
    functions: list[tuple[str, Mapping[str, Any]]] = []
    for i, tool in enumerate(tools):
        fn = tool.get("function") if isinstance(tool, Mapping) else None
        if not isinstance(tool, Mapping) or tool.get("type") != "function" or not isinstance(fn, Mapping):
            raise InvalidRequest(
                f'tools[{i}] must be {{"type": "function", "function": {{...}}}}: only function tools '
                "are supported",
                field="tools",
            )
        name, params = fn.get("name"), fn.get("parameters", {})
        if not isinstance(name, str) or not _NAME.match(name):
            raise InvalidRequest(
                f"tools[{i}].function.name must be 1-64 letters, digits, '_' or '-'", field="tools"
            )
        if not isinstance(params, Mapping):
            raise InvalidRequest(
                f"tools[{i}].function.parameters must be a JSON Schema object", field="tools"
            )
        if any(n == name for n, _ in functions):
            raise InvalidRequest(f"tools name function {name!r} twice", field="tools")
        functions.append((name, params))
    return functions
