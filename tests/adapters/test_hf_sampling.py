"""Sampling on the tiny model: every temperature in [0, 2] gives valid tokens, tiny temperatures are
greedy (no float32 overflow), and the per-row Python left on the hot path is measured, not timed."""

from __future__ import annotations

import pytest
import torch
from batcher.adapters.hf._backend import HFBackend
from batcher.adapters.hf._sampling import GREEDY_BELOW, RowSampler, sample
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from batcher.backend import NewSequence, SamplingParams

from .conftest import run_schedule, solo_greedy

_PROMPT = [900, 901, 902, 903]


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    temperature=st.one_of(
        st.floats(0.0, 2.0), st.floats(0.0, 1e-6), st.sampled_from([1e-45, 1e-40, 1e-30, 1e-7, 2.0])
    ),
    top_p=st.sampled_from([1.0, 0.9, 0.5]),
    top_k=st.sampled_from([0, 1, 50]),
    seed=st.one_of(st.none(), st.integers(0, 2**31)),
)
def test_every_temperature_in_0_2_gives_valid_tokens_and_tiny_ones_are_greedy(
    tiny: HFBackend, temperature: float, top_p: float, top_k: int, seed: int | None
) -> None:
    params = SamplingParams(max_tokens=6, temperature=temperature, top_p=top_p, top_k=top_k, seed=seed)
    others = [NewSequence(2, [1000, 1001], SamplingParams(max_tokens=6, temperature=1.0))]
    results, _ = run_schedule(tiny, {0: [NewSequence(1, _PROMPT, params), *others]})
    tokens = results[1].tokens
    vocab = tiny.model.get_input_embeddings().num_embeddings
    assert len(tokens) == 6 and all(0 <= t < vocab for t in tokens)
    if temperature < GREEDY_BELOW or top_k == 1:
        assert tokens == solo_greedy(tiny, _PROMPT, 6)


def test_tiny_temperatures_do_not_overflow() -> None:
    logits = torch.tensor([[1.0, 3.0, -2.0, 2.999], [0.0, -1.0, 5.0, 4.0]])
    gen = torch.Generator().manual_seed(0)
    for t in (1e-40, 1e-6, 1e-5, 1e-3):
        samplers = [RowSampler(temperature=t, top_k=0, top_p=1.0, seed=None) for _ in range(2)]
        assert sample(logits, samplers, gen) == [1, 2]


@pytest.mark.parametrize("seed", [7, None])
def test_seeded_rows_draw_alike_whatever_the_unseeded_rows_do(seed: int | None) -> None:
    torch.manual_seed(0)
    logits = torch.randn(4, 1000)
    gen = torch.Generator().manual_seed(1)

    def draw(companions: int) -> list[int]:
        rows = [RowSampler(temperature=1.0, top_k=0, top_p=1.0, seed=123)]
        rows += [RowSampler(temperature=1.0, top_k=0, top_p=1.0, seed=seed) for _ in range(companions)]
        return sample(logits[: 1 + companions], rows, gen)[:1]

    assert draw(0) == draw(3)
