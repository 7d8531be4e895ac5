"""What a sequence's output must be: :class:`ResponseFormat` (structured output, issue 12).

Plain, hashable data, so it can ride in :class:`~batcher.backend.SamplingParams` through the
torch-free core: a type and, for a schema, its JSON text. The Hugging Face backend compiles it into
a grammar and masks each step's logits with it (``batcher.adapters.hf._grammar``; the design and the
library choice: ``docs/structured-output.md``). :meth:`ResponseFormat.tool_call` turns function
tools into a format: an object naming one of the tools and holding that tool's arguments.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal

from ._errors import InvalidRequest

__all__ = ["FormatType", "ResponseFormat"]

FormatType = Literal["json_object", "json_schema"]


@dataclass(frozen=True, slots=True)
class ResponseFormat:
    """What a sequence's output must be. ``json_object``: any JSON object. ``json_schema``: an
    instance of ``schema`` (JSON text of a JSON Schema; properties come out in its order).
    Build one with :meth:`json_object`, :meth:`json_schema` or :meth:`tool_call`."""

    type: FormatType
    schema: str = ""

    def __post_init__(self) -> None:
        if self.type not in ("json_object", "json_schema"):
            raise InvalidRequest(
                f"response_format type must be 'json_object' or 'json_schema', got {self.type!r}",
                field="response_format",
            )
        if self.type == "json_object" and self.schema:
            raise InvalidRequest(
                "a json_object response_format takes no schema: use type 'json_schema'",
                field="response_format",
            )
        if self.type == "json_schema":
            try:
                parsed = json.loads(self.schema)
            except ValueError as exc:
                raise InvalidRequest(
                    f"response_format schema is not valid JSON ({exc}): send a JSON Schema object",
                    field="response_format",
                ) from exc
            if not isinstance(parsed, dict):
                raise InvalidRequest(
                    f"response_format schema must be a JSON object, got {type(parsed).__name__}",
                    field="response_format",
                )

    @classmethod
    def json_object(cls) -> ResponseFormat:
        return cls("json_object")

    @classmethod
    def json_schema(cls, schema: Mapping[str, Any]) -> ResponseFormat:
        """From a parsed schema (key order kept: it is the order the properties are generated in)."""
        return cls("json_schema", json.dumps(schema, separators=(",", ":"), ensure_ascii=False))

    @classmethod
    def tool_call(cls, tools: Sequence[tuple[str, Mapping[str, Any]]]) -> ResponseFormat:
        """One call of one of ``tools`` (``(name, parameters schema)`` pairs), as
        ``{"name": <one of the names>, "arguments": <an instance of that tool's parameters>}``."""
        if not tools:
            raise InvalidRequest("tools must name at least one function", field="tools")
        calls = [
            {
                "type": "object",
                "properties": {"name": {"const": name}, "arguments": dict(params) or {"type": "object"}},
                "required": ["name", "arguments"],
                "additionalProperties": False,
            }
            for name, params in tools
        ]
        return cls.json_schema(calls[0] if len(calls) == 1 else {"anyOf": calls})
