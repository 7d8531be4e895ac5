"""Tokenizing prompts for :class:`~batcher.adapters.HFBackend`: a tokenizer per thread, and a cap.

**A tokenizer per thread.** A Hugging Face fast tokenizer is not safe to share between threads
(the Rust object refuses a concurrent borrow when its settings change, as ``split_special_tokens``
does), so each thread that tokenizes gets its own copy (:class:`Tokenizers`). No lock is held
while tokenizing, and the Rust encoder releases the GIL: one huge prompt does not hold up a
small one tokenized on another thread.

**A cap.** A prompt far over the context is found without tokenizing it whole
(:func:`encode_capped`): text longer than two pieces is tokenized piece by piece (``PIECE``
characters, cut before a space that follows a non-space where the piece's last 256 characters
have one), and tokenizing stops once the pieces' tokens, less ``SLACK`` per cut, exceed the
limit. The bound is sound because a cut only changes the tokens within a token's length of it:
where the tokenizer pre-splits text at spaces (byte-level BPE: GPT-2, Llama 3, SmolLM2) a cut
before a space changes nothing, and elsewhere a merge across the cut joins at most a few
tokens, far fewer than ``SLACK`` (a test checks the bound against the real tokenizer on English,
code, CJK text and runs without spaces). A prompt under the cap is then tokenized whole, so its
ids are exactly what the tokenizer gives: tokenizing stops at about ``limit + SLACK`` tokens'
worth of text plus one piece, and a prompt that fits costs at most twice its tokenization.
"""

from __future__ import annotations

import copy
import threading
from typing import Any

from batcher import PromptTooLong

__all__ = ["PIECE", "SLACK", "Tokenizers", "encode_capped", "pieces"]

PIECE = 16_384  # characters per piece
SLACK = 32  # tokens a cut may add to the pieces' count (see the module doc)
_LOOK_BACK = 256  # characters before a piece's end searched for a space to cut at


class Tokenizers:
    """A copy of ``tokenizer`` per calling thread, made on its first call (under a lock: the
    original is only ever copied, never used to tokenize by this class)."""

    def __init__(self, tokenizer: Any) -> None:
        self._original = tokenizer
        self._local = threading.local()
        self._lock = threading.Lock()

    def get(self) -> Any:
        tok = getattr(self._local, "tokenizer", None)
        if tok is None:
            with self._lock:
                tok = copy.deepcopy(self._original)
            self._local.tokenizer = tok
        return tok


def pieces(text: str) -> list[tuple[int, int]]:
    """``text`` cut into ``(start, end)`` pieces of about ``PIECE`` characters, each cut just before
    a space that follows a non-space where one is near the piece's end."""
    cuts: list[tuple[int, int]] = []
    start = 0
    while len(text) - start > PIECE:
        end = start + PIECE
        at = text.rfind(" ", end - _LOOK_BACK, end)
        while at > end - _LOOK_BACK and text[at - 1].isspace():
            at = text.rfind(" ", end - _LOOK_BACK, at)
        if at > end - _LOOK_BACK:
            end = at
        cuts.append((start, end))
        start = end
    cuts.append((start, len(text)))
    return cuts


def encode_capped(tokenizer: Any, text: str, *, limit: int, what: str, **kw: Any) -> list[int]:
    """The token ids of ``text`` (``kw`` go to the tokenizer call), or :class:`PromptTooLong` as
    soon as it surely has more than ``limit`` tokens, without tokenizing the rest (module doc)."""
    if len(text) > 2 * PIECE:
        first = kw.pop("add_special_tokens", True)
        counted = 0
        for i, (start, end) in enumerate(pieces(text)):
            counted += len(tokenizer(text[start:end], add_special_tokens=first and i == 0, **kw)["input_ids"])
            at_least = counted - SLACK * i
            if at_least > limit:
                raise PromptTooLong(
                    f"{what} has more than {at_least} tokens (tokenizing stopped there, at character "
                    f"{end} of {len(text)}); the context is {limit + 1} tokens: shorten it",
                    limit=limit + 1,
                    requested=at_least,
                    field="prompt" if what == "prompt" else "messages",
                )
        kw["add_special_tokens"] = first
    return list(tokenizer(text, **kw)["input_ids"])
