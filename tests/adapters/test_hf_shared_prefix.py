"""Cascade attention for decode rows that share a prompt prefix (``_attention.Shared``): the rows
read the shared keys/values once and their own columns apart, and the two softmaxes merge. Their
tokens must not change: on the tiny model against the plain path and solo ``generate``, and on the
real SmolLM2 in float32 against plain transformers. Rows that share too little, or too few rows,
take the plain path."""

from __future__ import annotations

import pytest
import torch
from batcher.adapters.hf import _backend as hf
from batcher.adapters.hf._backend import HFBackend

from batcher.backend import NewSequence

from .conftest import greedy, run_schedule, solo_greedy

MIN_ROWS, MIN_TOKENS = hf._SHARED_MIN_ROWS, hf._SHARED_MIN_TOKENS


def system(words: int) -> str:
    return " ".join(f"Rule {i}: be brief and kind." for i in range(words))


def staggered(prompts: list[list[int]], max_tokens: int) -> dict[int, list[NewSequence]]:
    """Arrivals in three waves, so that rows sit at different columns of the slab."""
    seqs = [NewSequence(i, p, greedy(max_tokens - i % 3)) for i, p in enumerate(prompts)]
    third = len(seqs) // 3
    return {0: seqs[:third], 1: seqs[third : 2 * third], 3: seqs[2 * third :]}


def test_tiny_model_shared_prefix_rows_equal_the_plain_path_and_solo_generate(
    tiny: HFBackend, monkeypatch: pytest.MonkeyPatch
) -> None:
    head = tiny.tokenize(system(24))[: MIN_TOKENS + 10]
    prompts = [head + tiny.tokenize(f" question {i}?")[1:] for i in range(MIN_ROWS + 3)]
    outsiders = [tiny.tokenize(f"Other {i}. " + system(20))[:150] for i in range(2)]  # not members
    prompts[4:4] = outsiders
    before = tiny.shared_prefix_steps
    groupings: list[int] = []
    group = HFBackend._group
    monkeypatch.setattr(HFBackend, "_group", lambda self, n: groupings.append(n) or group(self, n))
    cascade, _ = run_schedule(tiny, staggered(prompts, 10))
    cascade_steps = tiny.shared_prefix_steps - before
    assert cascade_steps >= 5
    # regrouped only when rows joined or left (waves, finishes), not at every step
    assert 0 < len(groupings) < cascade_steps
    monkeypatch.setattr(hf, "_SHARED_MIN_ROWS", 10**9)
    plain, _ = run_schedule(tiny, staggered(prompts, 10))
    for i, p in enumerate(prompts):
        assert cascade[i].tokens == plain[i].tokens == solo_greedy(tiny, p, 10 - i % 3), i


def test_rows_leaving_and_joining_under_the_shared_prefix_keep_their_tokens(
    tiny: HFBackend, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Churn while the cascade runs: at each of four steps one row leaves (swap-removed: the last
    row moves into its slot) as one joins, so the decode rows change while their count stays. The
    grouping ``_shared`` reuses between steps must be the one it would compute afresh (a stale one
    moves a row's own columns by one: too small a change for the tiny model's tokens to show)."""
    head = tiny.tokenize(system(24))[: MIN_TOKENS + 10]
    prompts = [head + tiny.tokenize(f" question {i}?")[1:] for i in range(MIN_ROWS + 7)]
    start = MIN_ROWS + 3
    admits = {0: [NewSequence(i, p, greedy(14)) for i, p in enumerate(prompts[:start])]}
    drops: dict[int, list[int]] = {}
    for wave, i in enumerate(range(start, len(prompts))):
        admits[2 + wave] = [NewSequence(i, prompts[i], greedy(14))]
        drops[2 + wave] = [3 * wave]  # rows 0, 3, 6, 9 leave early
    checked: list[int] = []
    shared = HFBackend._shared

    def checking(self: HFBackend, n: int, col: int) -> object:
        out = shared(self, n, col)
        assert self._grouping is not None
        used, fresh = self._grouping[1], self._group(n)
        assert used is not None and fresh is not None
        assert all(torch.equal(a, b) for a, b in zip(used[:2], fresh[:2], strict=True))
        assert used[2:] == fresh[2:]
        checked.append(n)
        return out

    monkeypatch.setattr(HFBackend, "_shared", checking)
    got, _ = run_schedule(tiny, admits, drops)
    assert len(checked) >= 8 and checked.count(start - 1) >= 4  # the churn steps: same count
    for i, p in enumerate(prompts):
        want = solo_greedy(tiny, p, 14)
        left = i in {3 * w for w in range(len(prompts) - start)}
        assert got[i].tokens == (want[: len(got[i].tokens)] if left else want), i


def test_rows_sharing_too_little_take_the_plain_path(tiny: HFBackend) -> None:
    short = [tiny.tokenize(f"{i} " + system(2))[: MIN_TOKENS - 1] for i in range(MIN_ROWS + 2)]
    few = [[*tiny.tokenize(system(24))[: MIN_TOKENS + 5], i + 100] for i in range(MIN_ROWS - 1)]
    before = tiny.shared_prefix_steps
    for prompts in (short, few):
        run_schedule(tiny, {0: [NewSequence(i, p, greedy(4)) for i, p in enumerate(prompts)]})
    assert tiny.shared_prefix_steps == before


@pytest.mark.model
@pytest.mark.slow
def test_smollm2_fp32_rows_under_a_shared_system_prompt_equal_solo_generate(
    smol: HFBackend, smol_plain: object
) -> None:
    questions = [
        "What is the capital of France?",
        "Name a red fruit.",
        "How many legs has a spider?",
        "What colour is the sky?",
        "Say hello in Spanish.",
        "What is 2 + 3?",
        "Name a planet.",
        "What do bees make?",
        "Which animal barks?",
        "What is ice made of?",
        "Name a vowel.",
        "What is the opposite of hot?",
        "How many days are in a week?",
    ]
    sys_text = "You are a helpful assistant. " + system(18)
    prompts = [
        smol.tokenize([{"role": "system", "content": sys_text}, {"role": "user", "content": q}])
        for q in questions
    ]
    assert len(prompts) >= MIN_ROWS and min(len(p) for p in prompts) > MIN_TOKENS
    before = smol.shared_prefix_steps
    got, _ = run_schedule(smol, staggered(prompts, 8))
    assert smol.shared_prefix_steps - before >= 3
    for i, p in enumerate(prompts):
        assert got[i].tokens == solo_greedy(smol, p, 8 - i % 3, model=smol_plain), i
