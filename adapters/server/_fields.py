"""Which OpenAI request fields the server honours, ignores or refuses: one table, one check.

Every field of the chat and completions APIs (the ``openai`` client's own parameter lists, plus
the common vLLM extensions) has one entry here:

* ``supported``: read by the request models in ``_openai`` and honoured;
* ``ignored``: accepted and dropped, because it cannot change the generated text (``user``,
  ``metadata``, ``store``...);
* ``refused``: it would change the output and we cannot honour it, so any value other than its
  ``neutral`` ones (``null`` always, ``n: 1``, ``frequency_penalty: 0``...) gets a 400 naming it.

A field outside the table is refused too (OpenAI answers "Unrecognized request argument"). Work
that implements a field flips its entry to
``supported`` and adds it to the request model. ``docs/server.md`` renders this table.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Literal

from batcher import InvalidRequest

__all__ = ["FIELDS", "Endpoint", "FieldRule", "check_fields"]

Endpoint = Literal["chat", "completions"]
Policy = Literal["supported", "ignored", "refused"]
_BOTH: frozenset[Endpoint] = frozenset({"chat", "completions"})
_CHAT: frozenset[Endpoint] = frozenset({"chat"})
_COMPLETIONS: frozenset[Endpoint] = frozenset({"completions"})


@dataclass(frozen=True, slots=True)
class FieldRule:
    """What the server does with one request field, and why."""

    policy: Policy
    reason: str
    neutral: tuple[Any, ...] = ()
    endpoints: frozenset[Endpoint] = _BOTH


def _supported(reason: str, endpoints: frozenset[Endpoint] = _BOTH) -> FieldRule:
    return FieldRule("supported", reason, endpoints=endpoints)


def _ignored(reason: str, endpoints: frozenset[Endpoint] = _BOTH) -> FieldRule:
    return FieldRule("ignored", reason, endpoints=endpoints)


def _refused(reason: str, *neutral: Any, endpoints: frozenset[Endpoint] = _BOTH) -> FieldRule:
    return FieldRule("refused", reason, neutral, endpoints)


FIELDS: dict[str, FieldRule] = {
    # -- honoured ----------------------------------------------------------------------------
    "model": _supported("must name the served model or an alias (else 404 model_not_found)"),
    "messages": _supported("text content only (string or text parts)", _CHAT),
    "prompt": _supported(
        "a string or token ids, or a list of up to 64 of them (one choice each)", _COMPLETIONS
    ),
    "max_tokens": _supported("in [1, --max-tokens-limit]"),
    "max_completion_tokens": _supported("the same as max_tokens", _CHAT),
    "temperature": _supported("in [0, 2]; 0 is greedy"),
    "top_p": _supported("in (0, 1]"),
    "top_k": _supported("extension: sample from the k most likely tokens (0 = off)"),
    "seed": _supported("a seeded request samples the same tokens whatever its batch"),
    "stop": _supported("up to 16 strings, never included in the output"),
    "presence_penalty": _supported("in [-2, 2]: subtracted once from every token already generated"),
    "frequency_penalty": _supported("in [-2, 2]: subtracted per occurrence in the generated tokens"),
    "repetition_penalty": _supported("extension: in (0, 10], 1 = off; over prompt and output tokens"),
    "logit_bias": _supported("token id -> bias in [-100, 100], at most 300 entries"),
    "min_p": _supported("extension: in [0, 1]; drop tokens below min_p x the top probability"),
    "stream": _supported("server-sent events, then data: [DONE]"),
    "stream_options": _supported("include_usage; include_obfuscation is ignored"),
    "response_format": _supported(
        "text, json_object, json_schema (strict or not: the output always follows the schema)", _CHAT
    ),
    "tools": _supported("function tools; a call is forced by tool_choice", _CHAT),
    "tool_choice": _supported('"required", a named function, or "none"; "auto" gets a 400', _CHAT),
    "logprobs": _supported(
        "completions: 0 to 5 alternatives (legacy shape); chat: true, with top_logprobs; from the "
        "model's raw distribution, before penalties and temperature"
    ),
    "n": _supported("choices per prompt, up to 64 choices per request; a seed gives each its own"),
    "top_logprobs": _supported("0 to 20 alternatives per token; needs logprobs: true", _CHAT),
    # -- accepted, dropped: they cannot change the text ----------------------------------------
    "user": _ignored("an end-user id for the caller's records (carried, not used)"),
    "metadata": _ignored("stored-completion tags; nothing is stored"),
    "store": _ignored("nothing is stored"),
    "service_tier": _ignored("one tier here"),
    "parallel_tool_calls": _ignored("one call per answer: a forced call is one call", _CHAT),
    "prompt_cache_key": _ignored("a caching hint", _CHAT),
    "prompt_cache_retention": _ignored("a caching hint", _CHAT),
    "prompt_cache_options": _ignored("a caching hint", _CHAT),
    "safety_identifier": _ignored("an end-user id for abuse detection (not used)", _CHAT),
    "prediction": _ignored("predicted output is a latency hint; the text is the same", _CHAT),
    # -- would change the output: refused unless neutral ---------------------------------------
    "best_of": _refused("one candidate per prompt", 1, endpoints=_COMPLETIONS),
    "echo": _refused("the prompt is not echoed", False, endpoints=_COMPLETIONS),
    "suffix": _refused("no insertion (fill-in-the-middle) mode", "", endpoints=_COMPLETIONS),
    "functions": _refused("deprecated by OpenAI: send tools and tool_choice", [], endpoints=_CHAT),
    "function_call": _refused("deprecated by OpenAI: send tools and tool_choice", "none", endpoints=_CHAT),
    "audio": _refused("text output only", endpoints=_CHAT),
    "modalities": _refused("text output only", ["text"], endpoints=_CHAT),
    "reasoning_effort": _refused("not a reasoning model", endpoints=_CHAT),
    "verbosity": _refused("not a reasoning model", endpoints=_CHAT),
    "web_search_options": _refused("no web search", endpoints=_CHAT),
    "moderation": _refused("no moderation", endpoints=_CHAT),
    # vLLM extensions that clients of vLLM send
    "min_tokens": _refused("EOS cannot be suppressed yet", 0),
    "ignore_eos": _refused("EOS cannot be suppressed yet", False),
}


def check_fields(body: Mapping[str, Any], endpoint: Endpoint) -> None:
    """Raise :class:`InvalidRequest` (naming the field) for an unknown field, or a refused one
    whose value is not neutral. ``body`` is the parsed JSON object."""
    for name, value in body.items():
        rule = FIELDS.get(name)
        if rule is None or endpoint not in rule.endpoints:
            raise InvalidRequest(
                f"unrecognized request field {name!r} for {_PATHS[endpoint]}: remove it "
                "(docs/server.md lists the fields this server supports, ignores and refuses)",
                field=name,
            )
        if rule.policy == "refused" and not _neutral(value, rule.neutral):
            raise InvalidRequest(
                f"{name} is not supported ({rule.reason}): leave it unset"
                + (f" or send {_spell(rule.neutral)}" if rule.neutral else ""),
                field=name,
            )


_PATHS: dict[Endpoint, str] = {"chat": "/v1/chat/completions", "completions": "/v1/completions"}


def _neutral(value: Any, neutral: tuple[Any, ...]) -> bool:
    return value is None or any(_same(value, n) for n in neutral)


def _same(a: Any, b: Any) -> bool:
    """JSON equality where ``true`` is not ``1`` (``n: true`` is not ``n: 1``) but ``0.0`` is ``0``."""
    if isinstance(a, bool) or isinstance(b, bool):
        return type(a) is type(b) and a == b
    if isinstance(a, (int, float)) and isinstance(b, (int, float)):
        return a == b
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(_same(a[k], b[k]) for k in a)
    if isinstance(a, list) and isinstance(b, list):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b, strict=True))
    return type(a) is type(b) and a == b


def _spell(values: tuple[Any, ...]) -> str:
    return " or ".join(json.dumps(v) for v in values)
