"""Incremental detokenization: text deltas that never split a character or lose a space.

Decoding one token at a time is wrong twice over: a byte-level BPE token may hold half of a UTF-8
character (decoded alone it gives U+FFFD), and SentencePiece tokenizers drop the leading space of a
sequence's first token. So each step decodes a short window of ids, with a few tokens of context
before the new ones, and emits only what the window added past the context; while the decoded text
ends in U+FFFD (an incomplete character) nothing is emitted and the window grows (the offsets
scheme of TGI and vLLM). The concatenated deltas equal ``tokenizer.decode(generated ids)``.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence
from typing import Any

__all__ = ["Detokenizer", "TokenBytes", "decoder"]

_CONTEXT = 6  # prompt tokens kept as context before the first generated one
_MAX_HOLD = 8  # tokens an incomplete character may span before we emit it anyway (broken output)


class Detokenizer:
    """Feed token ids one at a time; get the new text they complete."""

    __slots__ = ("_decode", "_ids", "_prefix", "_read", "_skip")

    def __init__(self, tokenizer: Any, prompt_ids: Sequence[int], skip: frozenset[int]) -> None:
        self._decode = decoder(tokenizer)
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


def decoder(tokenizer: Any) -> Callable[[list[int]], str]:
    """``ids -> text`` without special tokens or clean-up. For a fast tokenizer whose decoding is
    transformers' own, the Rust tokenizer's ``decode`` directly: what ``tokenizer.decode`` calls,
    without its Python layers (1.1 instead of 3.4 us a call; a row decodes twice per token)."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None and type(tokenizer)._decode is _fast_decode():
        return functools.partial(backend.decode, skip_special_tokens=True)
    return functools.partial(tokenizer.decode, skip_special_tokens=True, clean_up_tokenization_spaces=False)


@functools.cache
def _fast_decode() -> object:
    from transformers import PreTrainedTokenizerFast

    return PreTrainedTokenizerFast._decode


class TokenBytes:
    """Each token's own bytes, as OpenAI's ``logprobs`` report them (``bytes``), cached per id.

    A byte-level BPE vocabulary (GPT-2, Llama 3, SmolLM2) spells every byte as one printable
    character; its token strings map back to bytes exactly, so a token holding half of a UTF-8
    character gives that half. Other vocabularies: ``<0xNN>`` byte-fallback tokens give their byte,
    the rest their text (SentencePiece's ``▁`` as a space). Special tokens give their text.
    """

    __slots__ = ("_byte_level", "_cache", "_special", "_tok")

    def __init__(self, tokenizer: Any) -> None:
        self._tok = tokenizer
        backend = getattr(tokenizer, "backend_tokenizer", None)
        self._byte_level = "ByteLevel" in repr(getattr(backend, "decoder", None))
        decoder = getattr(tokenizer, "added_tokens_decoder", {})
        self._special: dict[int, str] = {int(i): str(t.content) for i, t in decoder.items()}
        self._cache: dict[int, bytes] = {}

    def __call__(self, token_id: int) -> bytes:
        got = self._cache.get(token_id)
        if got is None:
            got = self._cache[token_id] = self._bytes(token_id)
        return got

    def _bytes(self, token_id: int) -> bytes:
        special = self._special.get(token_id)
        if special is not None:
            return special.encode()
        piece = str(self._tok.convert_ids_to_tokens(token_id))
        if self._byte_level and all(c in _UNICODE_TO_BYTE for c in piece):
            return bytes(_UNICODE_TO_BYTE[c] for c in piece)
        if len(piece) == 6 and piece.startswith("<0x") and piece.endswith(">"):
            return bytes([int(piece[3:5], 16)])
        return piece.replace("\u2581", " ").encode()


def _byte_alphabet() -> dict[str, int]:
    """Byte-level BPE's spelling of bytes: printable Latin-1 bytes stand for themselves, the other
    bytes (controls, space, 0x7f-0xa0, 0xad) for the characters from U+0100 on, in byte order."""
    printable = [*range(ord("!"), ord("~") + 1), *range(0xA1, 0xAD), *range(0xAE, 0x100)]
    table = {chr(b): b for b in printable}
    others = [b for b in range(256) if b not in printable]
    table |= {chr(0x100 + n): b for n, b in enumerate(others)}
    return table


_UNICODE_TO_BYTE = _byte_alphabet()
