"""Reusing the chat template's prefix when newcomers are prefilled.

Every chat prompt of a model starts with the same tokens: its template's header (for SmolLM2 the
default system prompt and the user turn's opening, 23 of a typical 45-token prompt). Their keys and
values depend only on those tokens and their positions 0..p-1, so they are computed once (at
``start``) and copied into each newcomer's slab row; the forward call then runs only the rest of
the prompt, attending to the copied prefix. A prompt qualifies only if its token ids really start
with the prefix ids, so the result is the same computation (in float32 the tests check tokens
equal solo ``generate``).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

__all__ = ["chat_prefix", "prefix_skip"]


def prefix_skip(prompt_ids: Sequence[int], prefix: Sequence[int]) -> int:
    """How many leading tokens of ``prompt_ids`` come from the prefix cache (0 or ``len(prefix)``;
    at least one prompt token is always computed, for its logits)."""
    p = len(prefix)
    if p and len(prompt_ids) > p and list(prompt_ids[:p]) == list(prefix):
        return p
    return 0


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
