"""The CUDA-graph path's static decode plans, run eagerly on the CPU (``capture=False``): bucket
padding, the whole-capacity mask and padding rows must not change a token. Capture itself needs a
GPU (``benchmarks/gpu_check.sh``)."""

from __future__ import annotations

import random

import pytest
from batcher.adapters.hf._backend import HFBackend
from batcher.adapters.hf._graphs import DecodeGraphs

from batcher import InvalidRequest
from batcher.backend import NewSequence

from .conftest import greedy, run_schedule, solo_greedy


def test_cuda_graphs_are_refused_off_cuda(tiny_dir: object) -> None:
    with pytest.raises(InvalidRequest, match="cuda_graphs=True needs a CUDA device") as info:
        HFBackend(str(tiny_dir), device="cpu", cuda_graphs=True)
    assert info.value.field == "cuda_graphs"


def test_static_decode_plans_give_the_eager_tokens(tiny: HFBackend, monkeypatch: pytest.MonkeyPatch) -> None:
    assert tiny.slab is not None
    graphs = DecodeGraphs(tiny.model, tiny.slab, tiny._pad, capture=False)
    monkeypatch.setattr(tiny, "_graphs", graphs)
    rng = random.Random(5)
    seqs = [
        NewSequence(
            i, [rng.randrange(200, 40_000) for _ in range(rng.randrange(1, 50))], greedy(rng.randrange(3, 30))
        )
        for i in range(11)
    ]
    admits = {0: seqs[:3], 2: seqs[3:4], 5: seqs[4:9], 9: seqs[9:]}
    results, _ = run_schedule(tiny, admits, {7: [2]})
    assert graphs.replays > 20  # most steps were decode-only and went through a bucket
    for s in seqs:
        expected = solo_greedy(tiny, s.prompt_ids, s.params.max_tokens)
        got = results[s.seq_id].tokens
        assert got == (expected[: len(got)] if s.seq_id == 2 else expected), f"sequence {s.seq_id}"
