"""The HF backend's prefix cache: keys/values of recent prompts and finished turns, reused by any new
prompt that starts with the same tokens (a system prompt, a few-shot block, the earlier turns of a
chat, the chat template's own header).

The index is the core's :class:`~batcher.backend.PrefixCache` (8-token blocks keyed by a hash
chain, LRU); the keys/values of its slots live in ``KVSlab.pool`` (``_cache``). Positions are
absolute, so a cached block holds exactly the keys/values a solo run computes at those positions.
This module adds what is tokenizer-specific: the chat template's fixed prefix.
"""

from __future__ import annotations

from typing import Any

from batcher.backend import PrefixCache, PrefixStats

__all__ = ["PrefixCache", "PrefixStats", "chat_prefix"]


def chat_prefix(tokenizer: Any) -> list[int]:
    """The token ids every chat prompt of this tokenizer starts with (empty if none)."""
    if not getattr(tokenizer, "chat_template", None):
        return []
    try:
        a, b = (
            tokenizer(
                tokenizer.apply_chat_template(
                    [{"role": "user", "content": text}], add_generation_prompt=True, tokenize=False
                ),
                add_special_tokens=False,
            )["input_ids"]
            for text in ("Hello there.", "Zebra 42?")
        )
    except Exception:  # a template that needs more than one user turn: no prefix reuse
        return []
    n = 0
    while n < min(len(a), len(b)) and a[n] == b[n]:
        n += 1
    # Leave out the last common token: the content's first token may merge with it.
    return list(a[: max(0, n - 1)]) if n >= 4 else []
