"""Incremental detokenization: text deltas that never split a character or lose a space.

Decoding one token at a time is wrong twice over: a byte-level BPE token may hold half of a UTF-8
character (decoded alone it gives U+FFFD), and SentencePiece tokenizers drop the leading space of a
sequence's first token. So each step decodes a short window of ids, with a few tokens of context
before the new ones, and emits only what the window added past the context; while the decoded text
ends in U+FFFD (an incomplete character) nothing is emitted and the window grows (the offsets
scheme of TGI and vLLM). The concatenated deltas equal ``tokenizer.decode(generated ids)``.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

__all__ = ["Detokenizer"]

_CONTEXT = 6  # prompt tokens kept as context before the first generated one
_MAX_HOLD = 8  # tokens an incomplete character may span before we emit it anyway (broken output)


class Detokenizer:
    """Feed token ids one at a time; get the new text they complete."""

    __slots__ = ("_ids", "_prefix", "_read", "_skip", "_tok")

    def __init__(self, tokenizer: Any, prompt_ids: Sequence[int], skip: frozenset[int]) -> None:
        self._tok = tokenizer
        self._skip = skip
        ctx = [t for t in prompt_ids[-_CONTEXT:] if t not in skip]
        self._ids: list[int] = list(ctx)
        self._prefix = 0  # start of the decode window
        self._read = len(ctx)  # ids before this are already emitted

    def feed(self, token_id: int) -> str:
        """The text that ``token_id`` completes (maybe empty while a character is incomplete)."""
        if token_id in self._skip:
            return ""
        self._ids.append(token_id)
        prefix_text = self._decode(self._ids[self._prefix : self._read])
        text = self._decode(self._ids[self._prefix :])
        pending = len(self._ids) - self._read
        if len(text) <= len(prefix_text) or (text.endswith("\ufffd") and pending < _MAX_HOLD):
            return ""
        self._prefix, self._read = self._read, len(self._ids)
        return text[len(prefix_text) :]

    def flush(self) -> str:
        """At the end of the sequence: whatever is still held (a character left incomplete)."""
        if self._read == len(self._ids):
            return ""
        prefix_text = self._decode(self._ids[self._prefix : self._read])
        text = self._decode(self._ids[self._prefix :])
        self._prefix = self._read = len(self._ids)
        return text[len(prefix_text) :]

    def _decode(self, ids: list[int]) -> str:
        return str(self._tok.decode(ids, skip_special_tokens=True, clean_up_tokenization_spaces=False))
