"""Planning the prefill of newcomers: grouping by length, reusing the chat-template prefix.

Prefix reuse
------------
Every chat prompt of a model starts with the same tokens: its template's header (for SmolLM2 the
default system prompt and the user turn's opening, 30 of a typical 45-token prompt). Their keys and
values depend only on those tokens and their positions 0..p-1, so they are computed once (at
``start``) and copied into each newcomer's slab row; the forward call then runs only the rest of
the prompt, attending to the copied prefix. A prompt qualifies only if its token ids really start
with the prefix ids, so the result is the same computation (in float32 the tests check tokens
equal solo ``generate``).

Grouping
--------
Newcomers are left-padded to the longest of their call. Very different lengths waste positions, and
every extra call costs one more pass over the weights: :func:`length_groups` splits the sorted
newcomers into runs minimizing ``padded positions + call_cost x calls`` (a small dynamic program).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from batcher import NewSequence

__all__ = ["PrefillGroup", "chat_prefix", "plan_prefill"]


@dataclass(frozen=True, slots=True)
class PrefillGroup:
    """Newcomers prefilled in one call: ``skip`` prefix tokens come from the prefix cache, the
    remaining ``len - skip`` are left-padded to ``width``."""

    seqs: list[NewSequence]
    skip: int
    width: int

    @property
    def lengths(self) -> list[int]:
        return [len(s.prompt_ids) for s in self.seqs]

    @property
    def padding(self) -> int:
        return sum(self.width - (k - self.skip) for k in self.lengths)

    def inputs(self, pad: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Input ids and position ids ``[m, width]``, and the boolean attention mask
        ``[m, 1, width, skip + width]`` over the prefix columns followed by the query columns."""
        skip, width = self.skip, self.width
        ids, pos, starts = [], [], []
        for s in self.seqs:
            q = len(s.prompt_ids) - skip
            ids.append([pad] * (width - q) + list(s.prompt_ids[skip:]))
            pos.append([0] * (width - q) + list(range(skip, skip + q)))
            starts.append(width - q)  # first real query column
        # Key column k of the call is slab column end - (skip + width) + k; query j sits at key
        # column skip + j. Row i's tokens (copied prefix, then its real queries) fill key columns
        # starts[i] .. skip + width - 1.
        qcol = torch.arange(width, device=device) + skip
        kcol = torch.arange(skip + width, device=device)
        real = kcol.unsqueeze(0) >= torch.tensor(starts, device=device).unsqueeze(1)
        causal = kcol.unsqueeze(0) <= qcol.unsqueeze(1)
        own = kcol.unsqueeze(0) == qcol.unsqueeze(1)  # a padding query attends to its own column
        mask = (causal.unsqueeze(0) & real.unsqueeze(1)) | own.unsqueeze(0)
        return torch.tensor(ids, device=device), torch.tensor(pos, device=device), mask.unsqueeze(1)


def plan_prefill(
    admit: Sequence[NewSequence], prefix: Sequence[int], call_cost: int
) -> list[PrefillGroup]:
    """Split newcomers into calls: those starting with ``prefix`` (and longer) skip it."""
    p = len(prefix)
    tup = tuple(prefix)
    with_prefix = [a for a in admit if p and len(a.prompt_ids) > p and tuple(a.prompt_ids[:p]) == tup]
    chosen = {id(a) for a in with_prefix}
    plain = [a for a in admit if id(a) not in chosen]
    groups = [
        PrefillGroup(g, 0, max(len(a.prompt_ids) for a in g)) for g in length_groups(plain, 0, call_cost)
    ]
    groups += [
        PrefillGroup(g, p, max(len(a.prompt_ids) for a in g) - p)
        for g in length_groups(with_prefix, p, call_cost)
    ]
    return groups


def length_groups(admit: Sequence[NewSequence], skip: int, call_cost: int) -> list[list[NewSequence]]:
    """Split into contiguous runs of the length-sorted newcomers, minimizing padded positions
    (lengths less ``skip``) + ``call_cost`` per run."""
    order = sorted(admit, key=lambda a: len(a.prompt_ids))
    lens = [len(a.prompt_ids) - skip for a in order]
    m = len(order)
    best = [0] + [1 << 62] * m  # best[j]: cost of the first j newcomers
    cut = [0] * (m + 1)
    for j in range(1, m + 1):
        for i in range(j):  # one call for order[i:j], padded to lens[j-1]
            c = best[i] + (j - i) * lens[j - 1] + call_cost
            if c < best[j]:
                best[j], cut[j] = c, i
    groups: list[list[NewSequence]] = []
    j = m
    while j:
        groups.append(order[cut[j] : j])
        j = cut[j]
    return groups[::-1]


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
