"""The OpenAI wire format of the example server: request models, response bodies, SSE chunks, errors.

Pure functions and pydantic models, no I/O: the ASGI layer (``_app``) calls them. Request models
ignore fields we do not use (clients send ``user``, ``logit_bias: null``...), but a field that would
change the output and that we cannot honour (``n > 1``, ``echo``, ``logprobs``, ``best_of > 1``,
token-id prompts, non-text message parts) is refused with a 400 that names it.
"""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import Mapping
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from batcher import InvalidRequest

__all__ = [
    "SSE_DONE",
    "ChatRequest",
    "CompletionRequest",
    "error_body",
    "sse_event",
]

SSE_DONE = b"data: [DONE]\n\n"


# -- requests ----------------------------------------------------------------------------------
class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="ignore", strict=True)
    include_usage: bool = False


class _Common(BaseModel):
    """Fields both endpoints share. ``strict``: "1" is not an int, "true" is not a bool."""

    model_config = ConfigDict(extra="ignore", strict=True)

    model: str | None = None
    max_tokens: int | None = None
    temperature: float | None = None
    top_p: float | None = None
    top_k: int | None = Field(None, description="Extension: sample from the k most likely tokens (0 = off).")
    seed: int | None = None
    stop: str | list[str] | None = None
    n: int | None = Field(1, description="Only 1 is supported.")
    stream: bool | None = False
    stream_options: StreamOptions | None = None
    logprobs: Any = None
    user: str | None = None

    def options(self) -> dict[str, Any]:
        """The :class:`batcher.GenerationOptions` this request asks for (unset fields omitted)."""
        if self.n not in (None, 1):
            raise InvalidRequest(f"n must be 1 (one choice per request), got {self.n}", field="n")
        if self.logprobs not in (None, False, 0):
            raise InvalidRequest("logprobs are not supported: leave them unset", field="logprobs")
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
        }
        return {k: v for k, v in opts.items() if v is not None}

    @property
    def include_usage(self) -> bool:
        return bool(self.stream and self.stream_options and self.stream_options.include_usage)


class CompletionRequest(_Common):
    """POST /v1/completions."""

    prompt: str | list[str] = Field(..., description="One prompt (a list of exactly one string).")
    echo: bool | None = False
    best_of: int | None = None

    def text_prompt(self) -> str:
        if self.echo:
            raise InvalidRequest("echo is not supported: leave it unset", field="echo")
        if self.best_of not in (None, 1):
            raise InvalidRequest(f"best_of must be 1, got {self.best_of}", field="best_of")
        if isinstance(self.prompt, str):
            return check_text(self.prompt, "prompt")
        if len(self.prompt) != 1:
            raise InvalidRequest(
                f"prompt must be one string (or a list of one), got a list of {len(self.prompt)}: "
                "send one request per prompt",
                field="prompt",
            )
        return check_text(self.prompt[0], "prompt")


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

    def full(self, text: str, finish_reason: str, usage: Mapping[str, int]) -> dict[str, Any]:
        """The non-streaming body."""
        if self.chat:
            choice: dict[str, Any] = {"index": 0, "message": {"role": "assistant", "content": text}}
        else:
            choice = {"index": 0, "text": text}
        choice |= {"finish_reason": finish_reason, "logprobs": None}
        return self._head("chat.completion" if self.chat else "text_completion") | {
            "choices": [choice],
            "usage": dict(usage),
        }

    def chunk(
        self, text: str | None, finish_reason: str | None = None, *, role: bool = False
    ) -> dict[str, Any]:
        """One streaming chunk with one choice (``text=None``: an empty delta)."""
        if self.chat:
            delta: dict[str, Any] = {"role": "assistant"} if role else {}
            if text is not None:
                delta["content"] = text
            choice: dict[str, Any] = {"index": 0, "delta": delta}
        else:
            choice = {"index": 0, "text": text or ""}
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
