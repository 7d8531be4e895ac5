"""One forward call per step: decode rows and newcomers' prompts packed into one token sequence.

Why
---
A step used to run the running rows' decode and the newcomers' prefill as separate forward calls
(and skipped the decode in steps with newcomers, so that a first token did not also wait for a
decode). Every call is one more pass over the weights, and every prefill-only step stalls all
running rows for a step. Packing runs both in one call: the input is ``[1, T]`` tokens (one per
decode row, then each newcomer's prompt, no padding), so the linear layers see one ``T``-row
product; only attention needs to know which token belongs to which row.

How
---
:class:`StepPlan` says where every token of the call goes. The slab's cache layer
(``_cache.KVSlab.update``) writes the call's new keys/values into their rows and columns (and
copies the reused chat prefix into newcomers' rows), and :func:`slab_attention`, registered with
transformers' ``AttentionInterface`` as ``"llm_batcher_slab"``, runs attention per part with
transformers' own SDPA function: the decode rows together (one query each, their window of the
slab, the left-padding mask), then each newcomer alone (its prompt's queries against its own row,
causal). The plan reaches the attention function as a keyword argument of the model call
(transformers passes unknown keyword arguments down to attention). Without a plan (``generate``
on ``backend.model``, say) the function is plain SDPA, with the same masks as ``"sdpa"``.

The backend's warm-up checks that every layer really wrote through the slab and attended with the
plan; a model whose code does not pass keyword arguments down is refused there.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

__all__ = ["ATTENTION", "NewRow", "StepPlan", "slab_attention"]

ATTENTION = "llm_batcher_slab"


@dataclass(slots=True)
class NewRow:
    """A newcomer in the packed call: its slab ``row``, its queries at ``off .. off+q-1`` of the
    call, its first slab column ``first`` (``skip`` reused prefix columns come first)."""

    row: int
    off: int
    q: int
    first: int
    skip: int
    mask: torch.Tensor | None  # [1, 1, q, skip + q] causal after the prefix; None: plain causal


@dataclass(slots=True)
class StepPlan:
    """Where the tokens of one packed call go. Decode rows ``0 .. n-1`` are the call's first
    ``n`` tokens and write column ``col``; they attend to columns ``start .. col`` under
    ``decode_mask`` ``[n, 1, 1, col + 1 - start]``. Newcomers' prompts end at column ``col``."""

    n: int
    col: int
    start: int
    decode_mask: torch.Tensor | None
    news: list[NewRow] = field(default_factory=list)
    ids: list[int] = field(default_factory=list)  # the call's input ids and position ids
    positions: list[int] = field(default_factory=list)
    updates: int = 0  # cache writes seen (the warm-up checks them) ...
    attended: int = 0  # ... and attention calls

    @property
    def tokens(self) -> int:
        return self.n + sum(r.q for r in self.news)

    def last_positions(self) -> list[int]:
        """Index in the call of each row's last token, decode rows first (where logits are kept)."""
        return [*range(self.n), *(r.off + r.q - 1 for r in self.news)]

    def attend(
        self,
        module: Any,
        query: torch.Tensor,
        keys: torch.Tensor,
        values: torch.Tensor,
        scaling: float | None,
    ) -> torch.Tensor:
        """Attention for the packed ``query`` ``[1, heads, T, dim]`` against the slab layer
        ``keys``/``values`` ``[rows, kv_heads, columns, dim]``: returns ``[1, T, heads, dim]``."""
        self.attended += 1
        parts: list[torch.Tensor] = []
        n, col = self.n, self.col
        if n:
            q = query[0, :, :n].transpose(0, 1).unsqueeze(2)  # [n, heads, 1, dim]
            window = slice(self.start, col + 1)
            out, _ = sdpa_attention_forward(
                module, q, keys[:n, :, window], values[:n, :, window], self.decode_mask, scaling=scaling
            )
            parts.append(out.reshape(1, n, *out.shape[2:]))  # [n, 1, heads, dim] -> [1, n, ...]
        for r in self.news:
            cols = slice(r.first, col + 1)
            out, _ = sdpa_attention_forward(
                module,
                query[:, :, r.off : r.off + r.q],
                keys[r.row : r.row + 1, :, cols],
                values[r.row : r.row + 1, :, cols],
                r.mask,
                scaling=scaling,
            )
            parts.append(out)
        return parts[0] if len(parts) == 1 else torch.cat(parts, dim=1)


def prefix_mask(q: int, skip: int, device: torch.device) -> torch.Tensor | None:
    """Query ``j`` (at absolute position ``skip + j``) sees key columns ``0 .. skip + j``."""
    if not skip:
        return None
    qpos = torch.arange(q, device=device).unsqueeze(1) + skip
    return (torch.arange(skip + q, device=device).unsqueeze(0) <= qpos).view(1, 1, q, skip + q)


def slab_attention(
    module: Any,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    dropout: float = 0.0,
    scaling: float | None = None,
    slab_plan: StepPlan | None = None,
    **kwargs: Any,
) -> tuple[torch.Tensor, None]:
    """The registered attention function: packed slab attention under a plan, else plain SDPA."""
    if slab_plan is None:
        return sdpa_attention_forward(
            module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, **kwargs
        )
    return slab_plan.attend(module, query, key, value, scaling), None


AttentionInterface.register(ATTENTION, slab_attention)
AttentionMaskInterface.register(ATTENTION, sdpa_mask)  # outside the backend's steps: masks as "sdpa"
