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

from batcher import InvalidRequest

from ._fields import Endpoint, check_fields

__all__ = [
    "SSE_DONE",
    "ChatRequest",
    "CompletionRequest",
    "error_body",
    "sse_event",
]

SSE_DONE = b"data: [DONE]\n\n"
#: The most prompts one completions request may carry (each is its own batcher request).
MAX_PROMPTS = 64
#: OpenAI's temperature range.
MAX_TEMPERATURE = 2.0


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
        }
        return {k: v for k, v in opts.items() if v is not None}

    @property
    def include_usage(self) -> bool:
        return bool(self.stream and self.stream_options and self.stream_options.include_usage)


class CompletionRequest(_Common):
    """POST /v1/completions."""

    endpoint: ClassVar[Endpoint] = "completions"
    prompt: str | list[str] = Field(..., description="A prompt, or a list of prompts (one choice each).")

    @model_validator(mode="before")
    @classmethod
    def _text_prompts(cls, data: Any) -> Any:
        prompt = data.get("prompt") if isinstance(data, Mapping) else None
        if isinstance(prompt, list) and any(isinstance(p, (int, list)) for p in prompt):
            raise InvalidRequest(
                "token-id prompts are not supported yet: send the prompt as text", field="prompt"
            )
        return data

    def prompts(self) -> list[str]:
        """The prompts, checked: one string, or a list of 1 to :data:`MAX_PROMPTS` strings."""
        prompts = [self.prompt] if isinstance(self.prompt, str) else self.prompt
        if not 1 <= len(prompts) <= MAX_PROMPTS:
            raise InvalidRequest(
                f"prompt must be a string or a list of 1 to {MAX_PROMPTS} strings, got a list of "
                f"{len(prompts)}",
                field="prompt",
            )
        return [check_text(p, "prompt") for p in prompts]


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
    """Builds the bodies of one response (one id, one ``created``) for either endpoint."""

    def __init__(self, *, chat: bool, model: str) -> None:
        self.chat = chat
        self.model = model
        self.id = new_id("chatcmpl" if chat else "cmpl")
        self.created = int(time.time())

    def _head(self, obj: str) -> dict[str, Any]:
        return {"id": self.id, "object": obj, "created": self.created, "model": self.model}

    def full(self, choices: Sequence[tuple[str, str]], usage: Mapping[str, int]) -> dict[str, Any]:
        """The non-streaming body: one choice per ``(text, finish_reason)``, ``index`` in order."""
        return self._head("chat.completion" if self.chat else "text_completion") | {
            "choices": [self._choice(i, text, reason) for i, (text, reason) in enumerate(choices)],
            "usage": dict(usage),
        }

    def _choice(self, index: int, text: str, finish_reason: str) -> dict[str, Any]:
        if self.chat:
            choice: dict[str, Any] = {"index": index, "message": {"role": "assistant", "content": text}}
        else:
            choice = {"index": index, "text": text}
        return choice | {"finish_reason": finish_reason, "logprobs": None}

    def chunk(
        self, text: str | None, finish_reason: str | None = None, *, role: bool = False, index: int = 0
    ) -> dict[str, Any]:
        """One streaming chunk with one choice (``text=None``: an empty delta)."""
        if self.chat:
            delta: dict[str, Any] = {"role": "assistant"} if role else {}
            if text is not None:
                delta["content"] = text
            choice: dict[str, Any] = {"index": index, "delta": delta}
        else:
            choice = {"index": index, "text": text or ""}
        choice |= {"finish_reason": finish_reason, "logprobs": None}
        return self._head("chat.completion.chunk" if self.chat else "text_completion") | {"choices": [choice]}

    def usage_chunk(self, usage: Mapping[str, int]) -> dict[str, Any]:
        """The last chunk when ``stream_options.include_usage``: no choices, only usage."""
        head = self._head("chat.completion.chunk" if self.chat else "text_completion")
        return head | {"choices": [], "usage": dict(usage)}


def sse_event(data: Mapping[str, Any]) -> bytes:
    """One server-sent event carrying a JSON object."""
    return b"data: " + json.dumps(data, ensure_ascii=False, separators=(",", ":")).encode() + b"\n\n"


def error_body(
    message: str, *, type: str, param: str | None = None, code: str | None = None
) -> dict[str, Any]:
    """An OpenAI-style error object (the body of every non-2xx response)."""
    return {"error": {"message": message, "type": type, "param": param, "code": code}}
