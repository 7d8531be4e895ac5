"""Validation of a generation call: its prompt and keyword options, into what an engine takes.

Every check runs before admission, so a bad request fails at once with :class:`InvalidRequest`
naming the field. The few distinct option sets a service sees are validated once and cached.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

from ._config import BatchConfig
from ._errors import InvalidRequest
from ._types import Prompt, SamplingParams, TokenIds, logit_bias_pairs

__all__ = ["DEFAULT_TENANT", "OPTION_FIELDS", "Options", "Parsed", "check_prompt"]

SAMPLING_FIELDS = frozenset(
    {
        "max_tokens",
        "temperature",
        "top_p",
        "top_k",
        "min_p",
        "seed",
        "stop",
        "presence_penalty",
        "frequency_penalty",
        "repetition_penalty",
        "logit_bias",
        "logprobs",
        "response_format",
    }
)
#: The keyword options of ``Batcher.stream`` and ``generate`` (:class:`~batcher.GenerationOptions`).
OPTION_FIELDS = SAMPLING_FIELDS | {"deadline_s", "priority", "tenant"}
#: The tenant of a request that names none.
DEFAULT_TENANT = "default"

#: A validated call: prompt, sampling parameters, deadline (seconds from now), priority, tenant.
Parsed = tuple[Prompt, SamplingParams, float | None, int, str]


class Options:
    """Validates calls against one batcher's config (``default_max_tokens``, ``max_tokens_limit``)."""

    def __init__(self, config: BatchConfig) -> None:
        self.config = config
        self._cache: dict[tuple[Any, ...], SamplingParams] = {}

    def parse(self, prompt: object, options: dict[str, Any]) -> Parsed:
        """Validate a call's prompt and options (``options`` is the call's own kwargs dict: it is
        consumed)."""
        if not options.keys() <= OPTION_FIELDS:
            unknown = sorted(options.keys() - OPTION_FIELDS)
            raise InvalidRequest(
                f"unknown parameter(s) {unknown}: known are {sorted(OPTION_FIELDS)}", field=unknown[0]
            )
        deadline_s = options.pop("deadline_s", None)
        priority = options.pop("priority", 0)
        tenant = options.pop("tenant", DEFAULT_TENANT)
        params = self._sampling_params(options)
        if deadline_s is not None and (type(deadline_s) not in (int, float) or not 0 < deadline_s < math.inf):
            raise InvalidRequest(
                f"deadline_s must be a positive number of seconds, got {deadline_s!r}", field="deadline_s"
            )
        if type(priority) is not int or not -1_000_000 <= priority <= 1_000_000:
            raise InvalidRequest(
                f"priority must be an integer in [-1000000, 1000000], got {priority!r}", field="priority"
            )
        if type(tenant) is not str or not 0 < len(tenant) <= 256:
            raise InvalidRequest(
                f"tenant must be a string of 1 to 256 characters, got {tenant!r:.80}", field="tenant"
            )
        if type(prompt) is not str or not prompt or not prompt.isascii():
            prompt = check_prompt(prompt)
        return prompt, params, deadline_s, priority, tenant

    def _sampling_params(self, opts: dict[str, Any]) -> SamplingParams:
        """Validated SamplingParams, cached by value and type (so ``True`` never passes for ``1``)."""
        key: tuple[Any, ...] | None = (*opts.items(), *map(type, opts.values()))
        try:
            cached = self._cache.get(key)  # type: ignore[arg-type]
        except TypeError:  # an unhashable value (a list of stops): validate without the cache
            key, cached = None, None
        if cached is not None:
            return cached
        stop = opts.get("stop")
        opts["stop"] = (stop,) if isinstance(stop, str) else tuple(stop or ())
        opts.setdefault("max_tokens", self.config.default_max_tokens)
        bias = opts.get("logit_bias")
        if isinstance(bias, Mapping):
            opts["logit_bias"] = logit_bias_pairs(bias)
        elif bias is None:
            opts.pop("logit_bias", None)
        if isinstance(opts["max_tokens"], int) and opts["max_tokens"] > self.config.max_tokens_limit:
            raise InvalidRequest(
                f"max_tokens must be <= {self.config.max_tokens_limit} (the "
                f"batcher's max_tokens_limit), got {opts['max_tokens']}",
                field="max_tokens",
            )
        params = SamplingParams(**opts)
        if key is not None and len(self._cache) < 1024:
            self._cache[key] = params
        return params


def _check_text(name: str, text: str) -> None:
    """Refuse text that is not valid Unicode (a lone surrogate, from JSON's "\\ud800"): no
    tokenizer can encode it."""
    if not text.isascii():
        try:
            text.encode("utf-8")
        except UnicodeEncodeError as e:
            raise InvalidRequest(
                f"{name} is not valid Unicode (character {e.start}: {text[e.start]!r}, a lone "
                "surrogate): send UTF-8 text",
                field=name.split(".")[0].split("[")[0],
            ) from None


def check_prompt(prompt: object) -> Prompt:
    """Validate the shape of a prompt (text, chat messages or token ids); return it unchanged."""
    if isinstance(prompt, TokenIds):
        return prompt  # checked on construction
    if isinstance(prompt, str):
        if not prompt:
            raise InvalidRequest("prompt is empty: send at least one character", field="prompt")
        _check_text("prompt", prompt)
        return prompt
    if isinstance(prompt, Sequence) and not isinstance(prompt, (bytes, bytearray)):
        if not prompt:
            raise InvalidRequest("messages is empty: send at least one message", field="messages")
        if isinstance(prompt[0], int):
            raise InvalidRequest(
                "a prompt of token ids must be wrapped: batcher.TokenIds((id, id, ...))", field="prompt"
            )
        for i, m in enumerate(prompt):
            if (
                not isinstance(m, Mapping)
                or not isinstance(m.get("role"), str)
                or not isinstance(m.get("content"), str)
            ):
                raise InvalidRequest(
                    f"messages[{i}] must be a mapping with string 'role' and 'content', got {m!r}",
                    field="messages",
                )
            _check_text(f"messages[{i}].content", m["content"])
        return prompt
    raise InvalidRequest(
        f"prompt must be a string, a list of chat messages or TokenIds, got {type(prompt).__name__}",
        field="prompt",
    )
