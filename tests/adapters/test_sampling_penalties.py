"""Penalties, logit bias and min-p, batched: against transformers' own repetition penalty, against a
plain per-row reference, and with unpenalised rows in the same batch left exactly as they were."""

from __future__ import annotations

import pytest
import torch
from batcher.adapters.hf._backend import HFBackend
from batcher.adapters.hf._sampling import Penalties, RowSampler, sample

from batcher.backend import NewSequence, SamplingParams

from .conftest import run_schedule, solo_greedy

_PROMPT = [900, 901, 902, 903, 900, 901]


def _reference(logits: torch.Tensor, prompt: list[int], out: list[int], p: SamplingParams) -> torch.Tensor:
    """One row's penalties the slow, obvious way (vLLM's definitions)."""
    row = logits.clone()
    for t in set(prompt) | set(out) if p.repetition_penalty != 1.0 else set(out):
        row[t] = row[t] / p.repetition_penalty if row[t] > 0 else row[t] * p.repetition_penalty
    for t in set(out):
        row[t] -= p.frequency_penalty * out.count(t) + p.presence_penalty
    for t, b in p.logit_bias:
        row[t] += b
    return row


def test_batched_penalties_equal_the_per_row_reference_through_compaction() -> None:
    torch.manual_seed(0)
    vocab = 50
    params = [
        SamplingParams(presence_penalty=0.7, frequency_penalty=0.3),
        SamplingParams(),  # unpenalised: untouched
        SamplingParams(repetition_penalty=1.5, logit_bias=((3, 5.0), (7, -100.0))),
        SamplingParams(frequency_penalty=-1.0, repetition_penalty=0.8),
    ]
    prompts = [[1, 2, 3], [4, 5], [6, 7, 8, 6], [9, 1]]
    pen = Penalties(vocab, torch.device("cpu"))
    pen.admit(0, prompts, params)
    outs: list[list[int]] = [[] for _ in params]
    for step in range(6):
        logits = torch.randn(len(params), vocab)
        got = pen.apply(logits.clone(), params)
        for i, p in enumerate(params):
            want = _reference(logits[i], prompts[i], outs[i], p) if p.penalised else logits[i]
            torch.testing.assert_close(got[i], want)
        tokens = [int(t) for t in torch.randint(0, vocab, (len(params),))]
        pen.record(tokens)
        for o, t in zip(outs, tokens, strict=True):
            o.append(t)
        if step == 2:  # the backend drops row 0: row 3 moves into its place
            pen.moved([(3, 0)], 3, any_penalised=True)
            for lst in (params, prompts, outs):
                lst[0] = lst.pop()  # type: ignore[index]


def test_no_penalised_row_means_no_state_and_logits_untouched() -> None:
    pen = Penalties(10, torch.device("cpu"))
    pen.admit(0, [[1, 2]], [SamplingParams(temperature=0.5)])
    logits = torch.randn(1, 10)
    assert pen.counts is None and pen.apply(logits, [SamplingParams()]) is logits
    pen.admit(1, [[3]], [SamplingParams(presence_penalty=1.0)])
    assert pen.counts is not None and pen.counts.shape == (2, 10)
    pen.moved([(1, 0)], 1, any_penalised=False)  # the penalised row left
    assert pen.counts is None


def test_repetition_penalty_equals_transformers_and_leaves_its_batch_mates_alone(tiny: HFBackend) -> None:
    rep = SamplingParams(max_tokens=12, repetition_penalty=0.3)  # < 1 favours seen tokens: it must bite
    plain = SamplingParams(max_tokens=12)
    seqs = [NewSequence(1, _PROMPT, rep), NewSequence(2, _PROMPT, plain), NewSequence(3, [5, 6, 7], plain)]
    results, _ = run_schedule(tiny, {0: seqs})
    x = torch.tensor([_PROMPT])
    with torch.inference_mode():
        want = tiny.model.generate(
            x,
            attention_mask=torch.ones_like(x),
            max_new_tokens=12,
            do_sample=False,
            repetition_penalty=0.3,
            pad_token_id=tiny.tokenizer.pad_token_id,
        )[0, x.shape[1] :].tolist()
    assert results[1].tokens == want
    assert results[2].tokens == solo_greedy(tiny, _PROMPT, 12)
    assert results[3].tokens == solo_greedy(tiny, [5, 6, 7], 12)
    assert results[1].tokens != results[2].tokens  # the penalty did something


def test_logit_bias_forces_a_token_in_a_sampled_row(tiny: HFBackend) -> None:
    forced = SamplingParams(max_tokens=5, temperature=1.0, seed=3, logit_bias=((4242, 100.0),))
    banned_top = solo_greedy(tiny, _PROMPT, 1)[0]
    ban = SamplingParams(max_tokens=1, logit_bias=((banned_top, -100.0),))
    results, _ = run_schedule(tiny, {0: [NewSequence(1, _PROMPT, forced), NewSequence(2, _PROMPT, ban)]})
    assert results[1].tokens == [4242] * 5
    assert results[2].tokens != [banned_top]


def test_min_p_one_keeps_only_the_top_token() -> None:
    torch.manual_seed(1)
    logits = torch.randn(8, 300)
    gen = torch.Generator().manual_seed(0)
    rows = [RowSampler(temperature=1.5, top_k=0, top_p=1.0, seed=None, min_p=1.0) for _ in range(8)]
    assert sample(logits, rows, gen) == logits.argmax(-1).tolist()
    loose = [RowSampler(temperature=1.5, top_k=0, top_p=1.0, seed=None, min_p=0.0) for _ in range(8)]
    assert sample(logits, loose, gen) != logits.argmax(-1).tolist()  # 8 draws from ~300 tokens


@pytest.mark.parametrize(
    "kw",
    [
        {"presence_penalty": 2.5},
        {"frequency_penalty": -3},
        {"repetition_penalty": 0},
        {"min_p": 1.5},
        {"logit_bias": ((1, 101.0),)},
        {"logit_bias": tuple((i, 1.0) for i in range(301))},
    ],
)
def test_out_of_range_values_are_refused_naming_the_field(kw: dict[str, object]) -> None:
    from batcher import InvalidRequest

    with pytest.raises(InvalidRequest) as e:
        SamplingParams(**kw)  # type: ignore[arg-type]
    assert next(iter(kw)) in str(e.value)
