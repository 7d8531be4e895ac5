"""Log-probabilities from the HF backend: sorted, consistent with greedy choice, computed only for
the rows that ask, and equal to a direct transformers computation on the real model."""

from __future__ import annotations

import math

import pytest
import torch
from batcher.adapters.hf._backend import HFBackend
from batcher.adapters.hf._sampling import top_logprobs

from batcher.backend import NewSequence, SamplingParams

from .conftest import run_schedule

_PROMPT = [900, 901, 902, 903]


def _outputs(backend: HFBackend, admit: list[NewSequence]) -> dict[int, list[object]]:
    """Every sequence's logprob entries, in token order."""
    seen: dict[int, list[object]] = {a.seq_id: [] for a in admit}
    results, steps = run_schedule(backend, {0: admit})
    for step in steps:
        for out in step.outputs:
            assert len(out.logprobs) in (0, len(out.token_ids))
            seen[out.seq_id] += out.logprobs
    for seq_id, entries in seen.items():
        assert not entries or len(entries) == len(results[seq_id].tokens)
    return seen


def test_greedy_rows_choose_their_top_logprob_and_alternatives_are_sorted(tiny: HFBackend) -> None:
    admit = [
        NewSequence(1, _PROMPT, SamplingParams(max_tokens=6, logprobs=5)),
        NewSequence(2, [1000, 1001], SamplingParams(max_tokens=6)),  # did not ask: gets none
        NewSequence(3, [1002], SamplingParams(max_tokens=6, logprobs=0, temperature=1.0, seed=3)),
    ]
    seen = _outputs(tiny, admit)
    assert seen[2] == []
    assert len(seen[1]) == 6 and len(seen[3]) == 6
    for entry in seen[1]:
        top = entry.top  # type: ignore[attr-defined]
        chosen = entry.chosen  # type: ignore[attr-defined]
        assert len(top) == 5
        assert [t.logprob for t in top] == sorted((t.logprob for t in top), reverse=True)
        assert top[0].token_id == chosen.token_id and top[0].logprob == chosen.logprob
        assert all(t.token_bytes for t in top)
    total = sum(e.chosen.logprob for e in seen[3])  # type: ignore[attr-defined]
    assert math.isfinite(total) and total <= 0
    assert all(e.top == () for e in seen[3])  # type: ignore[attr-defined]


def test_a_batch_where_no_row_asks_computes_nothing() -> None:
    assert top_logprobs(torch.zeros(3, 10), [None, None, None]) is None
    got = top_logprobs(torch.log(torch.tensor([[0.1, 0.6, 0.3], [0.5, 0.2, 0.3]])), [None, 2])
    assert got is not None and got.rows == [1]
    (entry,) = got.entries([0, 1], lambda t: bytes([t]))
    assert entry.chosen.token_id == 1 and entry.chosen.logprob == pytest.approx(math.log(0.2))
    assert [(t.token_id, t.token_bytes) for t in entry.top] == [(0, b"\x00"), (2, b"\x02")]
    assert [t.logprob for t in entry.top] == pytest.approx([math.log(0.5), math.log(0.3)])


def test_logprobs_are_the_raw_distribution_whatever_the_penalties(tiny: HFBackend) -> None:
    """A logit bias changes the choice, not the reported distribution (vLLM's raw_logprobs)."""
    plain = _outputs(tiny, [NewSequence(1, _PROMPT, SamplingParams(max_tokens=1, logprobs=3))])[1][0]
    forced = plain.top[2].token_id  # type: ignore[attr-defined]
    biased = SamplingParams(max_tokens=1, logprobs=3, logit_bias=((forced, 100.0),))
    entry = _outputs(tiny, [NewSequence(2, _PROMPT, biased)])[2][0]
    assert entry.chosen.token_id == forced  # type: ignore[attr-defined]
    assert entry.top == plain.top  # type: ignore[attr-defined]
    assert entry.chosen.logprob == pytest.approx(plain.top[2].logprob)  # type: ignore[attr-defined]


@pytest.mark.model
def test_logprobs_equal_a_direct_transformers_computation(smol: HFBackend, smol_plain: object) -> None:
    prompt = smol.tokenize("The capital of France is")
    admit = [NewSequence(1, prompt, SamplingParams(max_tokens=5, logprobs=3, temperature=0.9, seed=11))]
    admit.append(NewSequence(2, smol.tokenize("One, two, three,"), SamplingParams(max_tokens=5)))
    entries = _outputs(smol, admit)[1]
    tokens = [e.chosen.token_id for e in entries]  # type: ignore[attr-defined]
    x = torch.tensor([prompt + tokens])
    with torch.inference_mode():
        logits = smol_plain(x).logits[0].float()  # type: ignore[operator]
    direct = torch.log_softmax(logits, dim=-1)
    for k, entry in enumerate(entries):
        row = direct[len(prompt) - 1 + k]
        assert entry.chosen.logprob == pytest.approx(float(row[tokens[k]]), abs=1e-4)  # type: ignore[attr-defined]
        top = torch.topk(row, 3)
        assert [t.token_id for t in entry.top] == top.indices.tolist()  # type: ignore[attr-defined]
        assert [t.logprob for t in entry.top] == pytest.approx(top.values.tolist(), abs=1e-4)  # type: ignore[attr-defined]
