"""Refusing a prompt by its size before anything tokenizes it, and the body limit that follows.

Each character of a prompt belongs to one token, and a token that decodes to ``k`` characters
covers at most ``k`` of them; so a prompt needs at least ``sum(1 / W(c))`` tokens over its
characters ``c``, where ``W(c)`` is the longest decoded token that can hold ``c`` (for SmolLM2:
25 for a letter, 81 for a space or newline; a non-ASCII character may be split over tokens, so it
gets the longest token that holds a partial character, or that holds it whole). Two cheap, safe
checks follow, both before the tokenizer runs:

* more than ``(context - 1) * longest`` characters (``longest``: the longest decoded token, 81) is
  refused on its length alone (:attr:`PromptLimits.max_prompt_chars`, 663k for SmolLM2);
* a prompt longer than the context in characters has its characters counted
  (``collections.Counter``, C speed) and is refused if the bound above exceeds ``context - 1``
  (English text: from about 107k characters on).

Both answer ``context_length_exceeded``; neither refuses a prompt that fits. The argument holds
for byte-level BPE and SentencePiece vocabularies (no normalizer that merges characters); pass
``--max-prompt-chars`` for others. A backend without a vocabulary (the fake one) gets
:data:`FALLBACK_CHARS_PER_TOKEN` and no per-character count.

The body limit is ``2 * max_prompt_chars`` (a long prompt that fits is mostly runs of spaces and
punctuation: one or two bytes each in JSON) plus :data:`BODY_SLACK` for the other fields. Flags
override either limit.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from batcher import Prompt, PromptTooLong, TokenIds

if TYPE_CHECKING:
    from ._app import ServerSettings

__all__ = ["BODY_SLACK", "FALLBACK_CHARS_PER_TOKEN", "PromptLimits", "TokenWidths"]

#: Characters per token assumed for a backend without a vocabulary to measure.
FALLBACK_CHARS_PER_TOKEN = 32
#: Room in a body for everything but the prompt (stop strings, options, JSON punctuation).
BODY_SLACK = 64 * 1024
#: The limits before the model has loaded (nothing is generated then anyway: /v1 answers 503).
_LOADING_BYTES = 1 << 20


@dataclass(frozen=True, slots=True)
class TokenWidths:
    """``W(c)`` of the module doc: per ASCII character, and one width for everything else."""

    ascii: dict[str, int]
    other: int
    longest: int

    @classmethod
    def of(cls, tokenizer: Any) -> TokenWidths:
        widths: dict[str, int] = {}
        for token in tokenizer.get_vocab():
            text = tokenizer.convert_tokens_to_string([token])
            for c in set(text):
                widths[c] = max(widths.get(c, 0), len(text))
        longest = max(widths.values(), default=FALLBACK_CHARS_PER_TOKEN)
        ascii = {c: w for c, w in widths.items() if c.isascii()}
        other = max((w for c, w in widths.items() if not c.isascii()), default=longest)
        return cls(ascii, other, longest)

    def min_tokens(self, text: str) -> float:
        """A lower bound on the tokens ``text`` needs."""
        return sum(
            n / self.ascii.get(c, self.other if not c.isascii() else self.longest)
            for c, n in Counter(text).items()
        )


@dataclass(frozen=True, slots=True)
class PromptLimits:
    """The character bounds on a prompt and the byte bound on a body (see module doc)."""

    max_prompt_chars: int
    max_body_bytes: int
    context: int | None = None
    widths: TokenWidths | None = field(default=None, repr=False)

    @classmethod
    def before_load(cls, settings: ServerSettings) -> PromptLimits:
        return cls(settings.max_prompt_chars or _LOADING_BYTES, settings.max_body_bytes or _LOADING_BYTES)

    @classmethod
    def for_backend(cls, backend: Any, settings: ServerSettings) -> PromptLimits:
        """Derived from ``backend.max_context`` and ``backend.tokenizer``, where it has them."""
        context = getattr(backend, "max_context", None)
        if not isinstance(context, int) or context < 2:
            return cls.before_load(settings)
        tokenizer = getattr(backend, "tokenizer", None)
        widths = TokenWidths.of(tokenizer) if tokenizer is not None else None
        longest = widths.longest if widths is not None else FALLBACK_CHARS_PER_TOKEN
        chars = settings.max_prompt_chars or (context - 1) * longest
        return cls(chars, settings.max_body_bytes or 2 * chars + BODY_SLACK, context, widths)

    def check(self, prompt: Prompt) -> None:
        """Raise :class:`PromptTooLong` if ``prompt`` surely cannot fit the context."""
        if isinstance(prompt, TokenIds):
            if self.context is not None and len(prompt.ids) >= self.context:
                raise PromptTooLong(
                    f"the prompt has {len(prompt.ids)} token ids; the model's context is "
                    f"{self.context} tokens (prompt + at least one generated token): shorten it",
                    limit=self.context,
                    requested=len(prompt.ids),
                    field="prompt",
                )
            return
        text = prompt if isinstance(prompt, str) else "".join(_contents(prompt))
        where = "prompt" if isinstance(prompt, str) else "messages"
        if len(text) > self.max_prompt_chars:
            raise PromptTooLong(
                f"the {where} has {len(text)} characters, more than the {self.max_prompt_chars} "
                "that can fit the model's context: shorten it",
                limit=self.max_prompt_chars,
                requested=len(text),
                field=where,
            )
        if self.context is None or self.widths is None or len(text) < self.context:
            return
        needed = self.widths.min_tokens(text)
        if needed > self.context - 1:
            raise PromptTooLong(
                f"the {where} needs at least {int(needed)} tokens (counted from its characters "
                f"before tokenizing); the model's context is {self.context} tokens: shorten it",
                limit=self.context,
                requested=int(needed),
                field=where,
            )


def _contents(messages: Any) -> list[str]:
    return [m.get("content", "") for m in messages if isinstance(m, Mapping)]
