"""The KV store of :class:`~batcher.adapters.HFBackend`: one preallocated, left-padded slab.

Layout (per layer, keys and values alike)::

    rows     0 .. n-1           live sequences, in no particular order (a finished row is
                                 swap-removed: the last live row moves into its slot)
    columns  start .. end-1     the live window; every row's tokens *end* at column end-1
                                 (left padding), row r's first real column is ``first[r]``
    columns  end .. capacity-1  headroom: decode steps write column ``end`` in place

Why not ``DynamicCache``: it ``torch.cat``s every layer every step, copying the whole cache each
token (about 440 MB a step at batch 32 x 300 columns for SmolLM2 in fp32). Here a decode step
writes one column in place and attention reads a strided view of the window. The slab is
reallocated only when the headroom runs out, a newcomer needs more columns to the left than the
window has, or rows run out; then the live window is copied once.

Continuous batching on the slab (the TGI ``CausalLMBatch`` filter/concatenate design, in place):

* *merge*: newcomers are prefilled in the same forward call as the decode rows (``_attention``)
  straight into rows ``n .. n+m-1``, their prompts ending in the column the decode rows write.
  No copy: the attention function writes every token's keys/values with one indexed write.
* *filter*: a finished or cancelled row is replaced by the last live row (one row copy).
* *trim*: ``start`` becomes the smallest ``first[r]`` of the remaining rows, so padding columns
  no row needs are dropped from attention for free.

The padding of a row (columns ``start .. first[r]-1``) is masked out of attention by ``valid``.
Every slab cell holds a finite number (zeros, or a stale but finite key/value), so a masked score
never turns into NaN.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

__all__ = ["KVSlab"]


class KVSlab:
    """Preallocated keys/values for every layer, plus the per-row validity mask."""

    def __init__(
        self,
        *,
        layers: int,
        kv_heads: int,
        head_dim: int,
        dtype: torch.dtype,
        device: torch.device,
        headroom: int = 64,
    ) -> None:
        self.layers, self.kv_heads, self.head_dim = layers, kv_heads, head_dim
        self.dtype, self.device, self.headroom = dtype, device, headroom
        self.keys: list[torch.Tensor] = []
        self.values: list[torch.Tensor] = []
        self.valid = torch.zeros(0, 0, dtype=torch.bool, device=device)
        self.rows = 0  # live rows
        self.start = 0  # first live column
        self.end = 0  # next column to write
        self.first: list[int] = []  # first real column of each live row
        self.relayouts = 0  # how many times the slab was reallocated (for tests)
        # The prefix cache's pool (``_prefix``), per layer [2 (keys, values), kv_heads, slots,
        # head_dim]; it outlives the slab (``free`` keeps it).
        self.pool: list[torch.Tensor] = []

    # -- sizes ----------------------------------------------------------------------------
    @property
    def row_capacity(self) -> int:
        return self.valid.shape[0]

    @property
    def col_capacity(self) -> int:
        return self.valid.shape[1]

    @property
    def width(self) -> int:
        return self.end - self.start

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (*self.keys, *self.values))

    @property
    def pool_slots(self) -> int:
        return self.pool[0].shape[2] if self.pool else 0

    def allocate_pool(self, slots: int) -> None:
        """Allocate the prefix cache's pool of ``slots`` token slots per layer (``_prefix``)."""
        shape = (2, self.kv_heads, slots, self.head_dim)
        self.pool = [torch.empty(shape, dtype=self.dtype, device=self.device) for _ in range(self.layers)]

    def store(self, rows: Sequence[int], cols: Sequence[int], slots: Sequence[int]) -> None:
        """Copy the keys/values of slab cells ``(rows[i], cols[i])`` into pool slots ``slots[i]``:
        per layer one gather of keys and values and one indexed write, whatever the count."""
        if not slots:
            return
        host = torch.tensor([list(rows), list(cols), list(slots)], dtype=torch.long)
        r, c, s = host.to(self.device, non_blocking=True)
        h = torch.arange(self.kv_heads, device=self.device).unsqueeze(1)
        src = ((r.unsqueeze(0) * self.kv_heads + h) * self.col_capacity + c.unsqueeze(0)).reshape(-1)
        dst = (h * self.pool_slots + s.unsqueeze(0)).reshape(-1)
        dst = torch.cat([dst, dst + self.kv_heads * self.pool_slots])  # keys, then values
        dim = self.head_dim
        for kb, vb, pool in zip(self.keys, self.values, self.pool, strict=True):
            kv = torch.cat([kb.view(-1, dim).index_select(0, src), vb.view(-1, dim).index_select(0, src)])
            pool.view(-1, dim).index_copy_(0, dst, kv)

    # -- layout ---------------------------------------------------------------------------
    def reserve(self, *, new_rows: int, left: int, right: int) -> None:
        """Make room for ``new_rows`` more rows, ``left`` columns before ``end`` (a newcomer's
        prompt) and ``right`` columns from ``end`` on (tokens about to be written)."""
        rows = self.rows + new_rows
        if rows <= self.row_capacity and left <= self.end and self.end + right <= self.col_capacity:
            return
        self._relayout(rows, max(left, self.width), right)

    def _relayout(self, rows: int, left: int, right: int) -> None:
        """Reallocate: copy the live window so that it ends at column ``left`` (+ slack)."""
        row_cap = max(rows, self.row_capacity if rows <= self.row_capacity else 2 * self.row_capacity)
        slack = min(self.headroom, 64)
        new_end = left + slack
        col_cap = new_end + max(right, self.headroom)
        n, w = self.rows, self.width
        shape = (row_cap, self.kv_heads, col_cap, self.head_dim)
        keys = [torch.zeros(shape, dtype=self.dtype, device=self.device) for _ in range(self.layers)]
        values = [torch.zeros(shape, dtype=self.dtype, device=self.device) for _ in range(self.layers)]
        if n:
            for new, old in zip((*keys, *values), (*self.keys, *self.values), strict=True):
                new[:n, :, new_end - w : new_end] = old[:n, :, self.start : self.end]
        valid = torch.zeros(row_cap, col_cap, dtype=torch.bool, device=self.device)
        if n:
            valid[:n, new_end - w : new_end] = self.valid[:n, self.start : self.end]
        shift = new_end - self.end
        self.keys, self.values, self.valid = keys, values, valid
        self.first = [f + shift for f in self.first]
        self.start, self.end = new_end - w, new_end
        self.relayouts += 1

    def free(self) -> None:
        """Release all memory (the batch is empty)."""
        self.keys, self.values = [], []
        self.valid = torch.zeros(0, 0, dtype=torch.bool, device=self.device)
        self.rows = self.start = self.end = 0
        self.first = []

    def remove(self, rows: Sequence[int]) -> list[tuple[int, int]]:
        """Swap-remove ``rows``; return the ``(from, to)`` row moves made (callers move their
        own per-row state the same way). Then trim padding no remaining row needs."""
        gone = set(rows)
        n_new = self.rows - len(gone)
        holes = sorted(r for r in gone if r < n_new)
        movers = [r for r in range(n_new, self.rows) if r not in gone]
        moves = list(zip(movers, holes, strict=True))
        if moves:
            src = torch.tensor(movers, device=self.device)
            dst = torch.tensor(holes, device=self.device)
            s, e = self.start, self.end
            for t in (*self.keys, *self.values):
                t[dst, :, s:e] = t[src, :, s:e]
            self.valid[dst] = self.valid[src]
            for a, b in moves:
                self.first[b] = self.first[a]
        self.rows = n_new
        del self.first[n_new:]
        if n_new == 0:
            self.free()
        else:
            self.start = min(self.first)
        return moves

    def add_rows(self, prompt_lens: Sequence[int]) -> None:
        """Claim rows for newcomers whose prompts end at column ``end-1`` (left padding): call
        after the step's forward, once ``end`` is past the column it wrote."""
        n, m = self.rows, len(prompt_lens)
        first = [self.end - length for length in prompt_lens]
        cols = torch.arange(self.col_capacity, device=self.device)
        lo = torch.tensor(first, device=self.device).unsqueeze(1)
        self.valid[n : n + m] = (cols >= lo) & (cols < self.end)
        self.first += first
        self.rows = n + m
        self.start = min(self.first)
