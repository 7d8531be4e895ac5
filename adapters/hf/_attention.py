"""One forward call per step, and a fixed number of kernels per layer whatever joins the step.

The call's input is ``[1, T]`` tokens: one per decode row, then every newcomer's prompt (less its
reused prefix), unpadded. The linear layers see one ``T``-row product; only attention needs to know
which token belongs to which row. :class:`StepPlan` says so, with index tensors built once per step
(``_plan``), and :func:`slab_attention`, registered with transformers' ``AttentionInterface`` as
``"llm_batcher_slab"``, does per layer: one indexed write of the call's keys/values into the slab,
one indexed copy of the newcomers' cached prefixes (``_prefix``) into their rows, one attention
call for the decode rows over the slab window, and one padded attention call for all newcomers
together (the design and its measurements: ``docs/hf-backend.md``). The plan reaches attention as
a keyword argument of the model call; without one (``generate`` on ``backend.model``) the
function is plain SDPA.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

from ._cache import KVSlab

__all__ = [
    "ATTENTION",
    "NewRows",
    "Shared",
    "StepInterrupted",
    "StepPlan",
    "cells",
    "plan_step",
    "slab_attention",
]

ATTENTION = "llm_batcher_slab"


class StepInterrupted(Exception):
    """Raised at a layer's attention when the plan's ``halt(layer)`` says so: the step ends early,
    having written only keys/values that the step redoing it writes again (``HFBackend.interrupt``)."""


@dataclass(slots=True)
class NewRows:
    """The step's newcomers, as index tensors: they take slab rows ``row0 .. row0+m-1``; the call's
    tokens from ``n`` on are theirs, token ``i`` going to padded query slot ``(slot_b[i],
    slot_t[i])`` of a ``[m, width_q]`` grid; they attend to the last ``width_k`` columns of the
    window under the additive ``mask`` ``[m, 1, width_q, width_k]`` (0 or -inf). ``prefix_cells``
    (see :func:`cells`) get the prefix cache's pool slots ``prefix_src``."""

    row0: int
    m: int
    width_q: int
    width_k: int
    slot_b: torch.Tensor
    slot_t: torch.Tensor
    mask: torch.Tensor
    prefix_cells: torch.Tensor | None
    prefix_src: torch.Tensor | None


@dataclass(slots=True)
class Shared:
    """Decode rows ``members`` whose prompts start with the same ``length`` tokens: they attend to
    those tokens' keys/values once, in row ``leader``'s copy from column ``first`` on (each member
    holds an equal copy), and to their own columns ``rest .. stop-1`` apart, under the additive
    ``mask`` ``[n, 1, 1, stop - rest]`` (a member's shared columns masked out); the two softmaxes
    merge by their log-sum-exp (cascade attention: docs/hf-backend.md, "Shared prefixes")."""

    members: torch.Tensor
    leader: int
    first: int
    length: int
    rest: int
    mask: torch.Tensor


@dataclass(slots=True)
class StepPlan:
    """Where the tokens of one packed call go. Decode rows ``0 .. n-1`` are the call's first ``n``
    tokens; they attend to columns ``start .. stop-1`` under ``decode_mask`` ``[n, 1, 1, w]``. The
    call's keys/values go to the slab ``cells`` (see :func:`cells`); every prompt ends at ``col``.
    ``ids``/``positions`` are the call's inputs, ``keep`` the index of each row's last token."""

    slab: KVSlab
    n: int
    col: int
    start: int
    stop: int
    cells: torch.Tensor
    decode_mask: torch.Tensor | None
    news: NewRows | None
    ids: torch.Tensor
    positions: torch.Tensor
    keep: torch.Tensor
    cached: int = 0  # prompt tokens copied from the prefix cache
    attended: int = 0  # attention calls seen (the warm-up checks every layer made one)
    halt: Callable[[int], bool] | None = None  # asked before each layer: raise StepInterrupted?
    shared: Shared | None = None  # decode rows attending to a shared prefix once

    @property
    def tokens(self) -> int:
        return len(self.ids)

    def attend(
        self, module: Any, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, scaling: float | None
    ) -> torch.Tensor:
        """Write the call's ``key``/``value`` ``[1, kv_heads, T, dim]`` into the slab, then attend
        for the packed ``query`` ``[1, heads, T, dim]``: returns ``[1, T, heads, dim]``."""
        self.attended += 1
        layer = module.layer_idx
        if self.halt is not None and self.halt(layer):
            raise StepInterrupted(layer)
        kb, vb = self.slab.keys[layer], self.slab.values[layer]
        dim = kb.shape[-1]
        kb.view(-1, dim).index_copy_(0, self.cells, key[0].reshape(-1, dim))  # one indexed write each
        vb.view(-1, dim).index_copy_(0, self.cells, value[0].reshape(-1, dim))
        parts: list[torch.Tensor] = []
        if self.n:
            parts.append(self._decode(module, query, kb, vb, scaling))
        if self.news is not None:
            parts.append(self._prefill(self.news, module, query, kb, vb, layer, scaling))
        return parts[0] if len(parts) == 1 else torch.cat(parts, dim=1)

    def _decode(
        self, module: Any, query: torch.Tensor, kb: torch.Tensor, vb: torch.Tensor, scaling: float | None
    ) -> torch.Tensor:
        if self.shared is not None:
            return self._cascade(self.shared, query, kb, vb, scaling)
        n, window = self.n, slice(self.start, self.stop)
        q = query[0, :, :n].transpose(0, 1).unsqueeze(2)  # [n, heads, 1, dim]
        out, _ = sdpa_attention_forward(
            module, q, kb[:n, :, window], vb[:n, :, window], self.decode_mask, scaling=scaling
        )
        return out.reshape(1, n, *out.shape[2:])  # [n, 1, heads, dim] -> [1, n, heads, dim]

    def _cascade(
        self, sh: Shared, query: torch.Tensor, kb: torch.Tensor, vb: torch.Tensor, scaling: float | None
    ) -> torch.Tensor:
        """Decode attention in two parts, merged: every row over its own columns, and the members
        over the shared prefix in one batched product per key/value head. All in float32 (a
        half-precision slab's keys/values are widened: the own window and one prefix copy, small
        beside the rows' copies not read); returns ``[1, n, heads, dim]``."""
        n, heads, dim = self.n, query.shape[1], query.shape[3]
        kv = kb.shape[1]
        g, scale = heads // kv, scaling if scaling is not None else dim**-0.5
        q = query[0, :, :n].transpose(0, 1).reshape(n, kv, g, dim).float()  # head h reads kv h // g
        own_k = kb[:n, :, sh.rest : self.stop].float()
        own_v = vb[:n, :, sh.rest : self.stop].float()
        s = torch.matmul(q, own_k.transpose(-1, -2)).mul_(scale).add_(sh.mask)  # [n, kv, g, w]
        lse = torch.logsumexp(s, -1, keepdim=True)
        out = torch.matmul(s.sub_(lse).exp_(), own_v)  # [n, kv, g, dim]
        m = len(sh.members)
        cols = slice(sh.first, sh.first + sh.length)
        pre_k, pre_v = kb[sh.leader, :, cols].float(), vb[sh.leader, :, cols].float()  # [kv, length, dim]
        qm = q[sh.members].permute(1, 0, 2, 3).reshape(kv, m * g, dim)
        s1 = torch.bmm(qm, pre_k.transpose(1, 2)).mul_(scale)  # [kv, m * g, length]
        lse1 = torch.logsumexp(s1, -1, keepdim=True)
        out1 = torch.bmm(s1.sub_(lse1).exp_(), pre_v)
        out1 = out1.view(kv, m, g, dim).permute(1, 0, 2, 3)
        lse1 = lse1.view(kv, m, g, 1).permute(1, 0, 2, 3)
        lse2, out2 = lse[sh.members], out[sh.members]
        top = torch.maximum(lse1, lse2)
        w1, w2 = (lse1 - top).exp_(), (lse2 - top).exp_()
        out[sh.members] = (out1 * w1 + out2 * w2) / (w1 + w2)
        return out.to(query.dtype).reshape(1, n, heads, dim)

    def _prefill(
        self,
        news: NewRows,
        module: Any,
        query: torch.Tensor,
        kb: torch.Tensor,
        vb: torch.Tensor,
        layer: int,
        scaling: float | None,
    ) -> torch.Tensor:
        if news.prefix_cells is not None:
            assert news.prefix_src is not None
            cached = self.slab.pool[layer].index_select(2, news.prefix_src)  # [2, kv_heads, cells, dim]
            dim = kb.shape[-1]
            kb.view(-1, dim).index_copy_(0, news.prefix_cells, cached[0].reshape(-1, dim))
            vb.view(-1, dim).index_copy_(0, news.prefix_cells, cached[1].reshape(-1, dim))
        single = news.m == 1  # its tokens are the padded grid already: no scatter, no gather
        if single:
            q = query[:, :, self.n :]  # [1, heads, width_q, dim]
        else:
            heads, dim = query.shape[1], query.shape[3]
            grid = query.new_zeros(news.m, news.width_q, heads, dim)
            grid.index_put_((news.slot_b, news.slot_t), query[0, :, self.n :].transpose(0, 1))
            q = grid.transpose(1, 2)
        rows = slice(news.row0, news.row0 + news.m)
        cols = slice(self.col + 1 - news.width_k, self.col + 1)
        out = F.scaled_dot_product_attention(
            q,
            kb[rows, :, cols],
            vb[rows, :, cols],
            attn_mask=news.mask,
            scale=scaling,
            enable_gqa=query.shape[1] != kb.shape[1],
        )  # [m, heads, width_q, dim]
        if single:
            return out.transpose(1, 2)
        return out.transpose(1, 2)[news.slot_b, news.slot_t].unsqueeze(0)


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


def cells(rows: torch.Tensor, cols: torch.Tensor, heads: int, capacity: int) -> torch.Tensor:
    """Flat indices of slab cells ``(rows[i], head, cols[i])`` in a layer seen as ``[-1, dim]``,
    head-major (``[heads, len(rows)]``, the layout of a ``[1, heads, T, dim]`` key): one
    ``index_copy_`` of a contiguous slab (an ``index_put_`` through a transposed view of the slab
    measured ~1 ms per call on the CPU, 100x a plain copy)."""
    h = torch.arange(heads, device=rows.device).unsqueeze(1)
    return ((rows.unsqueeze(0) * heads + h) * capacity + cols.unsqueeze(0)).reshape(-1)


def plan_step(
    slab: KVSlab,
    n: int,
    lens: Sequence[int],
    skips: Sequence[int],
    ids: list[int],
    positions: list[int],
    sources: Sequence[int] = (),
) -> StepPlan:
    """The plan of a call with ``n`` decode rows then newcomers of prompt lengths ``lens`` (the first
    ``skips`` tokens of each copied from the prefix cache's pool slots ``sources``, newcomer after
    newcomer, ``sum(skips)`` of them): every index tensor is built here, with
    vectorised ops on the host and one transfer to the device, whatever the number of newcomers."""
    col, m = slab.end, len(lens)
    total = torch.tensor(lens, dtype=torch.long)
    skip = torch.tensor(skips, dtype=torch.long)
    q = total - skip
    owner = torch.repeat_interleave(torch.arange(m), q)  # the newcomer of each prompt token
    within = torch.arange(len(owner)) - (q.cumsum(0) - q)[owner]
    width_q = int(q.max()) if m else 0
    first = col + 1 - total
    pre_owner = torch.repeat_interleave(torch.arange(m), skip)
    pre_pos = torch.arange(len(pre_owner)) - (skip.cumsum(0) - skip)[pre_owner]
    parts = [
        torch.tensor(ids),
        torch.tensor(positions),
        torch.cat([torch.arange(n), n + owner]),  # slab row of each token
        torch.cat([torch.full((n,), col), col + 1 - q[owner] + within]),  # slab column of each token
        torch.cat([torch.arange(n), n + q.cumsum(0) - 1]),  # each row's last token in the call
        owner,
        width_q - q[owner] + within,  # padded query slot of each prompt token
        first,
        q,
        n + pre_owner,
        first[pre_owner] + pre_pos,
        torch.tensor(list(sources), dtype=torch.long),
    ]
    host = torch.cat(parts)
    dev = host.to(slab.device, non_blocking=True)
    split = dev.split_with_sizes([len(p) for p in parts])
    (tok, pos, rows, cols, keep, slot_b, slot_t, first_d, q_d, pre_rows, pre_cols, pre_src_d) = split
    heads, capacity = slab.kv_heads, slab.col_capacity
    decode_mask = None
    if n:
        decode_mask = slab.valid[:n, slab.start : col + 1].reshape(n, 1, 1, -1)
    news = None
    if m:
        width_k = int(total.max())
        key_col = torch.arange(col + 1 - width_k, col + 1, device=slab.device)
        query_col = torch.arange(col + 1 - width_q, col + 1, device=slab.device)
        padded = torch.arange(width_q, device=slab.device) < (width_q - q_d).unsqueeze(1)  # [m, wq]
        allowed = (key_col >= first_d.view(m, 1, 1)) & (
            (key_col <= query_col.view(1, -1, 1)) | padded.unsqueeze(2)
        )  # [m, wq, wk]: own prompt only, causal; padded slots see the whole prompt (no empty row)
        # additive, once per step: SDPA converts a boolean mask in every layer's call (the CPU's
        # newcomer attention measured 9.1 -> 5.3 ms per step over 30 layers)
        mask = torch.zeros(allowed.shape, dtype=slab.dtype, device=slab.device)
        mask.masked_fill_(~allowed, float("-inf"))
        reuse = bool(skip.any())
        news = NewRows(
            n,
            m,
            width_q,
            width_k,
            slot_b,
            slot_t,
            mask.unsqueeze(1),
            cells(pre_rows, pre_cols, heads, capacity) if reuse else None,
            pre_src_d if reuse else None,
        )
    return StepPlan(
        slab,
        n=n,
        col=col,
        start=slab.start,
        stop=col + 1,
        cells=cells(rows, cols, heads, capacity),
        decode_mask=decode_mask,
        news=news,
        ids=tok,
        positions=pos,
        keep=keep,
        cached=len(sources),
    )
