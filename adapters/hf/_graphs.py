"""CUDA graphs for decode-only steps (``HFBackend(cuda_graphs=True)``, CUDA only).

A decode step's kernels are many and small; on a GPU launching them costs more than running them.
A captured graph replays them all in one launch. Shapes and addresses must not change between
replays, so a graph serves a *batch-size bucket* (the step's rows padded up to 1, 2, 4, ... 256)
and one allocation of the KV slab: its static buffers hold the inputs (ids, positions, the column
written, the validity mask over the slab's *whole* column capacity instead of the live window), and
the slab itself stays put until a relayout, which drops the graphs (they are recaptured lazily).
Padding rows write their keys/values into unused slab rows and attend to that one column, so every
slab cell stays finite. Steps with newcomers run eagerly.

With ``capture=False`` the same static plan runs eagerly (no graph): the tests check on the CPU
that it gives the eager path's tokens.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from ._attention import StepPlan, cells
from ._cache import KVSlab

__all__ = ["BUCKETS", "DecodeGraphs"]

BUCKETS = (1, 2, 4, 8, 16, 32, 48, 64, 96, 128, 160, 192, 224, 256)


@dataclass(slots=True)
class _Static:
    """One bucket's static plan (its tensors are the graph's inputs) and, once captured, its graph
    and output."""

    plan: StepPlan
    base: torch.Tensor  # the plan's cells at column 0 (a step adds its column)
    graph: Any = None  # torch.cuda.CUDAGraph
    logits: torch.Tensor | None = None


class DecodeGraphs:
    """Decode-only steps through per-bucket static plans, replayed as CUDA graphs when ``capture``."""

    def __init__(self, model: Any, slab: KVSlab, pad_id: int, *, capture: bool = True) -> None:
        self.model, self.slab, self.pad_id, self.capture = model, slab, pad_id, capture
        self._static: dict[int, _Static] = {}
        self._layout: tuple[int, int, int] = (-1, -1, -1)
        self._pool: Any = None
        self.captures = 0  # graphs captured (for tests and the GPU check)
        self.replays = 0  # steps run through a static plan (replayed, or eagerly without capture)

    def bucket(self, n: int) -> int | None:
        """The smallest bucket that holds ``n`` rows and fits the slab, or None (run eagerly)."""
        return next((b for b in BUCKETS if n <= b <= self.slab.row_capacity), None)

    def decode(self, plan: StepPlan) -> torch.Tensor | None:
        """The logits of a decode-only ``plan`` ([n, vocab]) through its bucket, or None."""
        b = self.bucket(plan.n)
        if plan.news is not None or b is None:
            return None
        slab = self.slab
        layout = (slab.relayouts, slab.row_capacity, slab.col_capacity)
        if layout != self._layout:  # the slab moved: every graph points at the old one
            self._static.clear()
            self._layout = layout
        static = self._static.get(b)
        if static is None:
            static = self._static[b] = self._static_plan(b)
        self._fill(static, plan)
        self.replays += 1
        if not self.capture:
            return self._call(static.plan)[: plan.n]
        if static.graph is None:
            self._record(static)
        static.graph.replay()
        assert static.logits is not None
        return static.logits[: plan.n]

    def _static_plan(self, b: int) -> _Static:
        slab = self.slab
        dev, cols = slab.device, slab.col_capacity
        ids = torch.zeros(b, dtype=torch.long, device=dev)
        base = cells(torch.arange(b, device=dev), torch.zeros_like(ids), slab.kv_heads, cols)
        plan = StepPlan(
            self.slab,
            n=b,
            col=0,
            start=0,
            stop=cols,
            cells=base.clone(),
            decode_mask=torch.zeros(b, 1, 1, cols, dtype=torch.bool, device=dev),
            news=None,
            ids=ids,
            positions=torch.zeros_like(ids),
            keep=torch.arange(b, device=dev),
        )
        return _Static(plan, base)

    def _fill(self, buffers: _Static, plan: StepPlan) -> None:
        """Copy ``plan``'s inputs into the static buffers; padding rows read and write column ``col``."""
        static, n, col = buffers.plan, plan.n, plan.col
        static.ids.fill_(self.pad_id)
        static.ids[:n] = plan.ids
        static.positions.zero_()
        static.positions[:n] = plan.positions
        torch.add(buffers.base, col, out=static.cells)
        assert static.decode_mask is not None
        mask = static.decode_mask.view(static.n, -1)
        mask.copy_(self.slab.valid[: static.n])
        mask[n:] = False
        mask[n:, col] = True

    def _call(self, plan: StepPlan) -> torch.Tensor:
        out = self.model(
            input_ids=plan.ids.unsqueeze(0),
            attention_mask=torch.ones(1, 1, 1, 1, dtype=torch.bool, device=plan.ids.device),
            position_ids=plan.positions.unsqueeze(0),
            use_cache=False,
            logits_to_keep=plan.keep,
            slab_plan=plan,
        )
        logits: torch.Tensor = out.logits[0]
        return logits

    def _record(self, static: _Static) -> None:
        """Warm up on a side stream, then capture (the buffers already hold this step's inputs, so
        the warm-up runs write only what this step writes anyway, plus unused padding rows)."""
        side = torch.cuda.Stream()  # type: ignore[no-untyped-call]
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for _ in range(2):
                self._call(static.plan)
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self._pool):
            static.logits = self._call(static.plan)
        self._pool = graph.pool()
        static.graph = graph
        self.captures += 1
