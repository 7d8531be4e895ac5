"""A step's kernels do not grow with its newcomers: attention calls and copies per layer per step,
counted under a ``TorchDispatchMode`` while waves of 1, 7, 24 and 64 requests join a running batch."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from batcher.adapters.hf._backend import HFBackend
from batcher.adapters.hf._opcount import wave_ops

from batcher.backend import NewSequence, SamplingParams


@pytest.fixture
def tiny(tiny_dir: Path) -> Iterator[HFBackend]:
    """A backend of its own: no chance prefix hits on earlier tests' blocks (a random prompt whose
    first token heads a cached block reuses it), so each wave is as cold as the others."""
    backend = HFBackend(str(tiny_dir), dtype="float32", model_name="tiny")
    backend.start()
    yield backend
    backend.close()


def test_ops_per_layer_per_step_do_not_grow_with_newcomers(tiny: HFBackend) -> None:
    layers = tiny.model.config.num_hidden_layers
    steps = wave_ops(tiny, layers, (1, 7, 24, 64))
    assert [s.newcomers for s in steps] == [1, 0, 7, 0, 24, 0, 64, 0]
    assert [s.rows for s in steps] == [1, 1, 8, 8, 32, 32, 96, 96]
    for s in steps:
        assert s.attention <= 2, s  # decode rows over the slab + every newcomer together
        assert s.copies <= 8, s
        # keys and values; the prefix cache's keys and values copied in; the newcomers' query grid;
        # the step's new blocks stored into the cache's pool
        assert s.index_writes <= 6, s
    by_wave = {s.newcomers: s.total for s in steps if s.newcomers}
    assert by_wave[64] <= 1.1 * by_wave[7], f"aten ops per layer by newcomers: {by_wave}"
    assert tiny.live_sequences == 0 and tiny.kv_bytes == 0


def test_ops_per_layer_do_not_grow_with_newcomers_that_hit_the_prefix_cache(tiny: HFBackend) -> None:
    """Every newcomer reuses a cached 40-token head, copied into the rows by one gather and two
    indexed writes per layer whatever their number: a wave of 64 costs no more ops than 7."""
    layers = tiny.model.config.num_hidden_layers
    head = [300 + i for i in range(40)]
    tiny.step([NewSequence(10**6, [*head, 7], SamplingParams(max_tokens=1))], ())
    steps = wave_ops(tiny, layers, (1, 7, 64), head=head)
    assert all(s.cached_tokens >= 40 * s.newcomers for s in steps)
    by_wave = {s.newcomers: s.total for s in steps if s.newcomers}
    assert by_wave[64] <= 1.1 * by_wave[7], f"aten ops per layer by newcomers: {by_wave}"
    assert by_wave[1] <= by_wave[7]
