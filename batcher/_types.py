"""Value types shared by the public API and the backends: parameters, prompts, chunks, results."""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal, TypedDict

from ._errors import InvalidRequest
from ._response_format import ResponseFormat

__all__ = [
    "ChatMessage",
    "Chunk",
    "Completion",
    "FinishReason",
    "GenerationOptions",
    "Logprobs",
    "Outcome",
    "Prompt",
    "SamplingParams",
    "TokenIds",
    "TokenLogprob",
    "Usage",
]

#: Why a stream ended normally: ``"stop"`` (EOS or a stop string) or ``"length"`` (max_tokens).
FinishReason = Literal["stop", "length"]

#: How a request ended, exactly one per admitted or refused request (the ``outcome`` metric label).
Outcome = Literal["finished", "cancelled", "deadline", "overloaded", "failed", "rejected", "shutdown"]
OUTCOMES: tuple[Outcome, ...] = (
    "finished",
    "cancelled",
    "deadline",
    "overloaded",
    "failed",
    "rejected",
    "shutdown",
)

#: A chat message as the OpenAI API and chat templates spell it: ``{"role": ..., "content": ...}``.
ChatMessage = Mapping[str, str]


@dataclass(frozen=True, slots=True)
class TokenIds:
    """A prompt given as token ids of the backend's vocabulary, prefilled as they are (no chat
    template, no special tokens added). The backend checks them against its vocabulary and context."""

    ids: tuple[int, ...]

    def __post_init__(self) -> None:
        if not isinstance(self.ids, tuple) or not self.ids:
            raise InvalidRequest("a token-id prompt needs at least one token id", field="prompt")
        for i in self.ids:
            if type(i) is not int or i < 0:
                raise InvalidRequest(
                    f"token-id prompts hold non-negative integers, got {i!r}", field="prompt"
                )


#: A completion prompt (text or token ids) or a chat (messages, formatted by the chat template).
Prompt = str | Sequence[ChatMessage] | TokenIds

_ABSURD_MAX_TOKENS = 1 << 20
#: The most alternatives ``logprobs`` may ask for per token (OpenAI's ``top_logprobs`` limit).
MAX_LOGPROBS = 20


class GenerationOptions(TypedDict, total=False):
    """Keyword options of :meth:`Batcher.stream` and :meth:`Batcher.generate`.

    Sampling: ``max_tokens``, ``temperature`` (0 = greedy, the default), ``top_p``, ``top_k``
    (0 = off), ``min_p`` (0 = off), ``seed``, ``stop``; penalties ``presence_penalty`` and
    ``frequency_penalty`` (in [-2, 2], over generated tokens), ``repetition_penalty`` (1 = off,
    over prompt and generated tokens) and ``logit_bias`` (token id -> bias in [-100, 100]).
    ``logprobs``: each token's log-probability and that many most likely alternatives (0 to 20;
    unset = none), in :attr:`Chunk.logprobs`. ``response_format``: a :class:`ResponseFormat` the
    output must follow (JSON, an instance of a JSON schema, a tool call); unset = free text.
    Scheduling: ``deadline_s`` (seconds from now; the request fails with
    :class:`DeadlineExceeded` past it), ``priority`` (higher runs first among the tenant's own
    requests; waiting raises it) and ``tenant`` (who is asking: tenants share the batch by their
    ``BatchConfig.tenant_weights``; default ``"default"``).
    """

    max_tokens: int
    temperature: float
    top_p: float
    top_k: int
    min_p: float
    seed: int | None
    stop: str | Sequence[str] | None
    presence_penalty: float
    frequency_penalty: float
    repetition_penalty: float
    logit_bias: Mapping[int, float] | None
    logprobs: int | None
    response_format: ResponseFormat | None
    deadline_s: float | None
    priority: int
    tenant: str


@dataclass(frozen=True, slots=True, kw_only=True)
class SamplingParams:
    """How one sequence is generated. Validated on construction; the backend honours every field.

    ``temperature == 0`` means greedy decoding, whatever ``top_p``/``top_k``/``seed`` say. With a
    ``seed``, sampling draws from a generator of that request's own, so its tokens do not depend on
    which other requests share the batch. ``logprobs``: ``None`` computes none; ``k`` in [0, 20]
    reports each generated token's log-probability and the ``k`` most likely alternatives.
    ``response_format``: ``None`` is free text; a :class:`ResponseFormat` constrains the output to
    it (the backend masks the tokens that would leave it; ``docs/structured-output.md``).
    """

    max_tokens: int = 256
    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int = 0
    seed: int | None = None
    stop: tuple[str, ...] = ()
    min_p: float = 0.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repetition_penalty: float = 1.0
    logit_bias: tuple[tuple[int, float], ...] = ()  # (token id, bias), sorted by token id
    logprobs: int | None = None
    response_format: ResponseFormat | None = None

    def __post_init__(self) -> None:
        _check_int("max_tokens", self.max_tokens, low=1, high=_ABSURD_MAX_TOKENS)
        _check_float("temperature", self.temperature, low=0.0, high=100.0)
        _check_float("top_p", self.top_p, low=0.0, high=1.0, low_open=True)
        _check_int("top_k", self.top_k, low=0, high=_ABSURD_MAX_TOKENS)
        if self.seed is not None:
            _check_int("seed", self.seed, low=0, high=(1 << 63) - 1)
        if not isinstance(self.stop, tuple) or not all(isinstance(s, str) and s for s in self.stop):
            raise InvalidRequest(f"stop must be non-empty strings, got {self.stop!r}", field="stop")
        if len(self.stop) > 16:
            raise InvalidRequest(f"stop has {len(self.stop)} strings; at most 16 are allowed", field="stop")
        _check_float("min_p", self.min_p, low=0.0, high=1.0)
        _check_float("presence_penalty", self.presence_penalty, low=-2.0, high=2.0)
        _check_float("frequency_penalty", self.frequency_penalty, low=-2.0, high=2.0)
        _check_float("repetition_penalty", self.repetition_penalty, low=0.0, high=10.0, low_open=True)
        _check_logit_bias(self.logit_bias)
        if self.logprobs is not None:
            _check_int("logprobs", self.logprobs, low=0, high=MAX_LOGPROBS)
        if self.response_format is not None and not isinstance(self.response_format, ResponseFormat):
            raise InvalidRequest(
                "response_format must be a batcher.ResponseFormat (ResponseFormat.json_object(), "
                f"ResponseFormat.json_schema(schema)), got {type(self.response_format).__name__}",
                field="response_format",
            )

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0

    @property
    def penalised(self) -> bool:
        """Whether any penalty or logit bias changes this sequence's logits."""
        return bool(
            self.presence_penalty
            or self.frequency_penalty
            or self.repetition_penalty != 1.0
            or self.logit_bias
        )


#: The most entries a ``logit_bias`` may hold (OpenAI's limit).
MAX_LOGIT_BIAS = 300


def logit_bias_pairs(bias: Mapping[Any, Any]) -> tuple[tuple[int, float], ...]:
    """A ``logit_bias`` mapping (keys: token ids as ints or decimal strings, as JSON sends them)
    as the sorted pairs :class:`SamplingParams` holds."""
    pairs = []
    for key, value in bias.items():
        if isinstance(key, str) and key.strip().isdigit():
            key = int(key)
        if isinstance(key, bool) or not isinstance(key, int):
            raise InvalidRequest(f"logit_bias keys must be token ids, got {key!r}", field="logit_bias")
        pairs.append((key, value))
    return tuple(sorted(pairs))


def _check_logit_bias(pairs: object) -> None:
    if not isinstance(pairs, tuple) or not all(isinstance(p, tuple) and len(p) == 2 for p in pairs):
        raise InvalidRequest(f"logit_bias must be (token id, bias) pairs, got {pairs!r}", field="logit_bias")
    if len(pairs) > MAX_LOGIT_BIAS:
        raise InvalidRequest(
            f"logit_bias has {len(pairs)} entries; at most {MAX_LOGIT_BIAS} are allowed", field="logit_bias"
        )
    for token, bias in pairs:
        try:
            _check_int("its token id", token, low=0, high=(1 << 31) - 1)
            _check_float("its bias", bias, low=-100.0, high=100.0)
        except InvalidRequest as e:
            raise InvalidRequest(f"logit_bias entry {token!r}: {e}", field="logit_bias") from None


def _check_int(name: str, value: object, *, low: int, high: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int):
        raise InvalidRequest(f"{name} must be an integer, got {type(value).__name__} {value!r}", field=name)
    if not low <= value <= high:
        raise InvalidRequest(f"{name} must be in [{low}, {high}], got {value}", field=name)


def _check_float(name: str, value: object, *, low: float, high: float, low_open: bool = False) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise InvalidRequest(f"{name} must be a number, got {type(value).__name__} {value!r}", field=name)
    bad_low = value <= low if low_open else value < low
    if not math.isfinite(value) or bad_low or value > high:
        bracket = "(" if low_open else "["
        raise InvalidRequest(f"{name} must be in {bracket}{low}, {high}], got {value}", field=name)


@dataclass(frozen=True, slots=True)
class Usage:
    """Token counts of one request, as the OpenAI API reports them."""

    prompt_tokens: int
    completion_tokens: int

    def __init__(self, prompt_tokens: int, completion_tokens: int) -> None:
        # Built for every finished stream: set the slots directly (the generated __init__ of a
        # frozen dataclass goes through object.__setattr__, twice as slow).
        _set_usage_prompt(self, prompt_tokens)
        _set_usage_completion(self, completion_tokens)

    @property
    def total_tokens(self) -> int:
        return self.prompt_tokens + self.completion_tokens


@dataclass(frozen=True, slots=True)
class TokenLogprob:
    """A token and its log-probability (natural log, <= 0). ``token_bytes``: the token's own bytes,
    which may hold part of a UTF-8 character (a byte-level tokenizer splits some characters)."""

    token_id: int
    logprob: float
    token_bytes: bytes


@dataclass(frozen=True, slots=True)
class Logprobs:
    """The log-probabilities at one generated position: the ``chosen`` token and the ``top`` most
    likely tokens, most likely first (as many as ``SamplingParams.logprobs`` asked for)."""

    chosen: TokenLogprob
    top: tuple[TokenLogprob, ...] = ()


@dataclass(frozen=True, slots=True)
class Chunk:
    """One delivery to a stream: new text and token ids since the last chunk.

    When the consumer lags, deltas that piled up are merged into one chunk (the mailbox stays
    bounded; their ``logprobs`` concatenate). The last chunk of a stream has ``finish_reason`` and
    ``usage`` set; its text may be empty. ``logprobs``: one entry per token id when the request
    asked for them, else empty.
    """

    text: str
    token_ids: tuple[int, ...]
    finish_reason: FinishReason | None = None
    usage: Usage | None = None
    logprobs: tuple[Logprobs, ...] = ()

    def __init__(
        self,
        text: str,
        token_ids: tuple[int, ...],
        finish_reason: FinishReason | None = None,
        usage: Usage | None = None,
        logprobs: tuple[Logprobs, ...] = (),
    ) -> None:
        # One per delivered chunk, on the loop's hot path: see Usage.__init__.
        _set_chunk_text(self, text)
        _set_chunk_ids(self, token_ids)
        _set_chunk_reason(self, finish_reason)
        _set_chunk_usage(self, usage)
        _set_chunk_logprobs(self, logprobs)


def slot_setters(cls: type, *names: str) -> tuple[Callable[[Any, Any], None], ...]:
    """The setters of a frozen slots dataclass's fields, which bypass its frozen ``__setattr__``:
    for hand-written ``__init__``s on hot paths only (twice as fast as the generated one)."""
    return tuple(cls.__dict__[name].__set__ for name in names)


_set_usage_prompt, _set_usage_completion = slot_setters(Usage, "prompt_tokens", "completion_tokens")
_set_chunk_text, _set_chunk_ids, _set_chunk_reason, _set_chunk_usage, _set_chunk_logprobs = slot_setters(
    Chunk, "text", "token_ids", "finish_reason", "usage", "logprobs"
)


@dataclass(frozen=True, slots=True)
class Completion:
    """The whole result of :meth:`Batcher.generate`."""

    text: str
    token_ids: tuple[int, ...]
    finish_reason: FinishReason
    usage: Usage
    logprobs: tuple[Logprobs, ...] = ()
