"""The OpenAI wire format of the example server: request models, response bodies, SSE chunks, errors.

Pure functions and pydantic models, no I/O: the ASGI layer (``_app``) calls them. Which fields a
request may carry is decided by the one table in ``_fields`` (supported, ignored, refused); the
models here read the supported ones and check their ranges with one message per limit.
"""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import Mapping, Sequence
from typing import Any, ClassVar, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from batcher import InvalidRequest, Prompt, TokenIds
from batcher.backend import Logprobs, ResponseFormat, TokenLogprob

from ._fields import Endpoint, check_fields
from ._structured import requested_format, tool_calls

__all__ = [
    "SSE_DONE",
    "ChatRequest",
    "CompletionRequest",
    "error_body",
    "sse_event",
]

SSE_DONE = b"data: [DONE]\n\n"
#: The most choices one request may ask for (prompts x n; each is its own batcher request).
MAX_PROMPTS = 64
#: OpenAI's temperature range.
MAX_TEMPERATURE = 2.0
#: The most alternatives per token: completions' legacy ``logprobs``, chat's ``top_logprobs``.
MAX_COMPLETION_LOGPROBS = 5
MAX_TOP_LOGPROBS = 20


# -- requests ----------------------------------------------------------------------------------
class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="ignore", strict=True)
    include_usage: bool = False


class _Common(BaseModel):
    """Fields both endpoints share. ``strict``: "1" is not an int, "true" is not a bool."""

    model_config = ConfigDict(extra="ignore", strict=True)
    endpoint: ClassVar[Endpoint]

    model: str | None = None
    max_tokens: int | None = None
    temperature: float | None = Field(None, description="In [0, 2]; 0 is greedy.")
    top_p: float | None = None
    top_k: int | None = Field(None, description="Extension: sample from the k most likely tokens (0 = off).")
    seed: int | None = None
    stop: str | list[str] | None = None
    min_p: float | None = None
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    repetition_penalty: float | None = None
    logit_bias: dict[str, float] | None = None
    n: int | None = None
    stream: bool | None = False
    stream_options: StreamOptions | None = None
    user: str | None = None

    @model_validator(mode="before")
    @classmethod
    def _known_fields(cls, data: Any) -> Any:
        if isinstance(data, Mapping):
            check_fields(data, cls.endpoint)
        return data

    def options(self, max_tokens_limit: int) -> dict[str, Any]:
        """The :class:`batcher.GenerationOptions` this request asks for (unset fields omitted)."""
        if self.max_tokens is not None and not 1 <= self.max_tokens <= max_tokens_limit:
            raise InvalidRequest(
                f"max_tokens must be an integer in [1, {max_tokens_limit}] (this server's limit), "
                f"got {self.max_tokens}",
                field="max_tokens",
            )
        if self.temperature is not None and not 0 <= self.temperature <= MAX_TEMPERATURE:
            raise InvalidRequest(
                f"temperature must be in [0, {MAX_TEMPERATURE:g}], got {self.temperature}",
                field="temperature",
            )
        stop = [self.stop] if isinstance(self.stop, str) else self.stop
        for text in stop or ():
            check_text(text, "stop")
        opts: dict[str, Any] = {
            "max_tokens": self.max_tokens,
            "temperature": self.temperature,
            "top_p": self.top_p,
            "top_k": self.top_k,
            "seed": self.seed,
            "stop": tuple(stop) if stop else None,
            "min_p": self.min_p,
            "presence_penalty": self.presence_penalty,
            "frequency_penalty": self.frequency_penalty,
            "repetition_penalty": self.repetition_penalty,
            "logit_bias": self.logit_bias or None,
            "logprobs": self.logprobs_k(),
            "response_format": self.structured(),
        }
        return {k: v for k, v in opts.items() if v is not None}

    def choices(self, prompts: int) -> int:
        """``n``, checked: choices per prompt, at most :data:`MAX_PROMPTS` choices in all."""
        n = 1 if self.n is None else self.n
        if not 1 <= n <= MAX_PROMPTS // prompts:
            raise InvalidRequest(
                f"n must be an integer in [1, {MAX_PROMPTS // prompts}] (at most {MAX_PROMPTS} choices "
                f"per request, over {prompts} prompt(s)), got {n}",
                field="n",
            )
        return n

    def logprobs_k(self) -> int | None:
        """How many alternatives per token the request wants (None: no logprobs)."""
        return None

    def structured(self) -> ResponseFormat | None:
        """The format the output must follow (None: free text)."""
        return None

    @property
    def include_usage(self) -> bool:
        return bool(self.stream and self.stream_options and self.stream_options.include_usage)


class CompletionRequest(_Common):
    """POST /v1/completions."""

    endpoint: ClassVar[Endpoint] = "completions"
    prompt: str | list[str] | list[int] | list[list[int]] = Field(
        ..., description="A prompt (text or token ids), or a list of them (one choice each)."
    )
    logprobs: int | None = Field(None, description="0 to 5: each token's logprob and that many alternatives.")

    def logprobs_k(self) -> int | None:
        if self.logprobs is not None and not 0 <= self.logprobs <= MAX_COMPLETION_LOGPROBS:
            raise InvalidRequest(
                f"logprobs must be an integer in [0, {MAX_COMPLETION_LOGPROBS}], got {self.logprobs}",
                field="logprobs",
            )
        return self.logprobs

    @model_validator(mode="before")
    @classmethod
    def _prompt_shape(cls, data: Any) -> Any:
        prompt = data.get("prompt") if isinstance(data, Mapping) else None
        if isinstance(prompt, list) and not _prompt_list(prompt):
            raise InvalidRequest(
                "prompt must be a string, a list of strings, a list of token ids (integers) or a "
                "list of such lists",
                field="prompt",
            )
        return data

    def prompts(self) -> list[Prompt]:
        """The prompts, checked: a string or token ids, or a list of 1 to :data:`MAX_PROMPTS` of them."""
        p = self.prompt
        single = isinstance(p, str) or (bool(p) and isinstance(p[0], int))
        prompts: list[Any] = [p] if single else list(p)
        if not 1 <= len(prompts) <= MAX_PROMPTS:
            raise InvalidRequest(
                f"prompt must be a string, token ids, or a list of 1 to {MAX_PROMPTS} of them, got a "
                f"list of {len(prompts)}",
                field="prompt",
            )
        return [check_text(x, "prompt") if isinstance(x, str) else TokenIds(tuple(x)) for x in prompts]


class TextPart(BaseModel):
    model_config = ConfigDict(extra="ignore", strict=True)
    type: Literal["text"]
    text: str


class ChatMessageIn(BaseModel):
    model_config = ConfigDict(extra="ignore", strict=True)
    role: Literal["system", "developer", "user", "assistant"]
    content: str | list[TextPart]


class ChatRequest(_Common):
    """POST /v1/chat/completions."""

    endpoint: ClassVar[Endpoint] = "chat"
    messages: list[ChatMessageIn]
    max_completion_tokens: int | None = None
    logprobs: bool | None = None
    top_logprobs: int | None = None
    response_format: dict[str, Any] | None = None
    tools: list[Any] | None = None
    tool_choice: str | dict[str, Any] | None = None

    def structured(self) -> ResponseFormat | None:
        body = {"response_format": self.response_format, "tools": self.tools, "tool_choice": self.tool_choice}
        return requested_format(body)

    @property
    def calls_tool(self) -> bool:
        """Whether the answer is a forced tool call (``message.tool_calls``)."""
        return bool(self.tools) and self.tool_choice not in (None, "none")

    def logprobs_k(self) -> int | None:
        if self.top_logprobs is not None:
            if not self.logprobs:
                raise InvalidRequest("top_logprobs needs logprobs: true", field="top_logprobs")
            if not 0 <= self.top_logprobs <= MAX_TOP_LOGPROBS:
                raise InvalidRequest(
                    f"top_logprobs must be an integer in [0, {MAX_TOP_LOGPROBS}], got {self.top_logprobs}",
                    field="top_logprobs",
                )
        return (self.top_logprobs or 0) if self.logprobs else None

    def chat_prompt(self) -> list[dict[str, str]]:
        if self.max_completion_tokens is not None:
            if self.max_tokens is not None and self.max_tokens != self.max_completion_tokens:
                raise InvalidRequest(
                    "max_tokens and max_completion_tokens disagree: send one of them",
                    field="max_completion_tokens",
                )
            self.max_tokens = self.max_completion_tokens
        return [
            {
                "role": "system" if m.role == "developer" else m.role,
                "content": check_text(
                    m.content if isinstance(m.content, str) else "".join(p.text for p in m.content),
                    f"messages.{i}.content",
                ),
            }
            for i, m in enumerate(self.messages)
        ]


def _prompt_list(prompt: list[Any]) -> bool:
    """Whether a JSON list is strings, token ids, or lists of token ids (an empty list passes:
    :meth:`CompletionRequest.prompts` says it needs 1 to 64)."""
    return (
        all(isinstance(x, str) for x in prompt)
        or all(_is(x, int) for x in prompt)
        or all(isinstance(x, list) and all(_is(i, int) for i in x) for x in prompt)
    )


def _is(value: Any, kind: type) -> bool:
    """JSON type check where ``true`` is not an integer."""
    return isinstance(value, kind) and not (kind is int and isinstance(value, bool))


def check_text(text: str, field: str) -> str:
    """Refuse text that is not valid Unicode: JSON can carry a lone surrogate (``"\\ud800"``),
    which no tokenizer can encode."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as e:
        raise InvalidRequest(
            f"{field} contains an unpaired surrogate at position {e.start}: send valid UTF-8 text",
            field=field,
        ) from None
    return text


# -- responses ---------------------------------------------------------------------------------
def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex}"


def usage_body(prompt_tokens: int, completion_tokens: int) -> dict[str, int]:
    return {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
    }


class ResponseShape:
    """Builds the bodies of one response (one id, one ``created``) for either endpoint.
    ``logprobs``: whether the request asked for them (else every choice's ``logprobs`` is null).
    ``tools``: the answer is a forced tool call: a finished choice's text becomes
    ``message.tool_calls`` with ``finish_reason: "tool_calls"`` (one that ran out of tokens keeps
    its incomplete text as ``content``, with ``"length"``)."""

    def __init__(self, *, chat: bool, model: str, logprobs: bool = False, tools: bool = False) -> None:
        self.chat = chat
        self.model = model
        self.logprobs = logprobs
        self.tools = tools
        self.id = new_id("chatcmpl" if chat else "cmpl")
        self.created = int(time.time())

    def _head(self, obj: str) -> dict[str, Any]:
        return {"id": self.id, "object": obj, "created": self.created, "model": self.model}

    def full(self, choices: Sequence[Choice], usage: Mapping[str, int]) -> dict[str, Any]:
        """The non-streaming body: one choice each, ``index`` in order."""
        return self._head("chat.completion" if self.chat else "text_completion") | {
            "choices": [self._choice(i, c) for i, c in enumerate(choices)],
            "usage": dict(usage),
        }

    def _choice(self, index: int, c: Choice) -> dict[str, Any]:
        reason = c.finish_reason
        if self.tools and reason == "stop":
            message = {"role": "assistant", "content": None, "tool_calls": tool_calls(c.text)}
            choice: dict[str, Any] = {"index": index, "message": message}
            reason = "tool_calls"
        elif self.chat:
            choice = {"index": index, "message": {"role": "assistant", "content": c.text}}
        else:
            choice = {"index": index, "text": c.text}
        return choice | {"finish_reason": reason, "logprobs": self._logprobs(c.logprobs, 0)}

    def tool_chunks(self, text: str, finish_reason: str, *, index: int = 0) -> list[dict[str, Any]]:
        """A streamed tool call's chunks, once its text is complete: one delta holding the whole
        call (id, name, arguments: OpenAI's clients accumulate deltas, so one is valid), then the
        ``"tool_calls"`` finish. Text cut by ``max_tokens`` is sent as content, with ``"length"``."""
        if finish_reason != "stop":
            return [self.chunk(text or None, finish_reason, index=index)]
        calls = [{"index": k} | call for k, call in enumerate(tool_calls(text))]
        head = self._head("chat.completion.chunk")
        delta = {"index": index, "delta": {"tool_calls": calls}, "finish_reason": None, "logprobs": None}
        return [head | {"choices": [delta]}, self.chunk(None, "tool_calls", index=index)]

    def chunk(
        self,
        text: str | None,
        finish_reason: str | None = None,
        *,
        role: bool = False,
        index: int = 0,
        logprobs: Sequence[Logprobs] = (),
        offset: int = 0,
    ) -> dict[str, Any]:
        """One streaming chunk with one choice (``text=None``: an empty delta). ``offset``: where
        this chunk's text starts in the choice's text (the legacy ``text_offset``)."""
        if self.chat:
            delta: dict[str, Any] = {"role": "assistant"} if role else {}
            if text is not None:
                delta["content"] = text
            choice: dict[str, Any] = {"index": index, "delta": delta}
        else:
            choice = {"index": index, "text": text or ""}
        choice |= {
            "finish_reason": finish_reason,
            "logprobs": self._logprobs(logprobs, offset) if not role else None,
        }
        return self._head("chat.completion.chunk" if self.chat else "text_completion") | {"choices": [choice]}

    def usage_chunk(self, usage: Mapping[str, int]) -> dict[str, Any]:
        """The last chunk when ``stream_options.include_usage``: no choices, only usage."""
        head = self._head("chat.completion.chunk" if self.chat else "text_completion")
        return head | {"choices": [], "usage": dict(usage)}

    def _logprobs(self, entries: Sequence[Logprobs], offset: int) -> dict[str, Any] | None:
        if not self.logprobs:
            return None
        return chat_logprobs(entries) if self.chat else completion_logprobs(entries, offset)


class Choice:
    """One finished choice: its text, why it ended, its per-token logprobs (if asked)."""

    __slots__ = ("finish_reason", "logprobs", "text")

    def __init__(self, text: str, finish_reason: str, logprobs: Sequence[Logprobs] = ()) -> None:
        self.text, self.finish_reason, self.logprobs = text, finish_reason, logprobs


def token_text(raw: bytes) -> str:
    """A token's text as OpenAI shows it: its UTF-8 text, or ``bytes:\\xNN...`` for a token that
    holds part of a character (its ``bytes`` field carries the exact bytes either way)."""
    try:
        return raw.decode()
    except UnicodeDecodeError:
        return "bytes:" + "".join(f"\\x{b:02x}" for b in raw)


def chat_logprobs(entries: Sequence[Logprobs]) -> dict[str, Any]:
    """Chat's ``logprobs``: per token, its text, logprob, bytes and ``top_logprobs``."""

    def one(t: TokenLogprob) -> dict[str, Any]:
        return {"token": token_text(t.token_bytes), "logprob": t.logprob, "bytes": list(t.token_bytes)}

    return {
        "content": [one(e.chosen) | {"top_logprobs": [one(t) for t in e.top]} for e in entries],
        "refusal": None,
    }


def completion_logprobs(entries: Sequence[Logprobs], offset: int = 0) -> dict[str, Any]:
    """Completions' legacy ``logprobs``: parallel lists; each ``top_logprobs`` dict holds the top
    alternatives and the chosen token (up to ``logprobs + 1`` entries, as OpenAI documents);
    ``text_offset`` counts characters of the token texts from ``offset``."""
    tokens = [token_text(e.chosen.token_bytes) for e in entries]
    offsets = []
    for t in tokens:
        offsets.append(offset)
        offset += len(t)
    tops = [{token_text(t.token_bytes): t.logprob for t in (*e.top, e.chosen)} for e in entries]
    return {
        "tokens": tokens,
        "token_logprobs": [e.chosen.logprob for e in entries],
        "top_logprobs": tops,
        "text_offset": offsets,
    }


def sse_event(data: Mapping[str, Any]) -> bytes:
    """One server-sent event carrying a JSON object."""
    return b"data: " + json.dumps(data, ensure_ascii=False, separators=(",", ":")).encode() + b"\n\n"


def error_body(
    message: str, *, type: str, param: str | None = None, code: str | None = None
) -> dict[str, Any]:
    """An OpenAI-style error object (the body of every non-2xx response)."""
    return {"error": {"message": message, "type": type, "param": param, "code": code}}
