"""The prefix cache on the real SmolLM2-135M-Instruct in float32: cached (a roomy pool, and a tiny
one that evicts all the time) == uncached == solo ``generate`` of plain transformers, token for
token, with shared system prompts, arrivals, a cancellation and a second turn that extends the
first with the model's answer."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from batcher.adapters.hf._backend import HFBackend

from batcher.backend import NewSequence

from .conftest import greedy, run_schedule, solo_greedy

pytestmark = [pytest.mark.model, pytest.mark.slow]

SYSTEM = (
    "You are a careful assistant for a small bakery. Answer in one or two short sentences, be "
    "friendly, never invent prices, and mention that orders are taken until six in the evening."
)
QUESTIONS = [
    "Do you sell rye bread?",
    "Can I order a birthday cake for Saturday?",
    "What time do you open?",
    "Hi!",
    "Are your croissants made with butter?",
    "Do you have gluten-free options?",
]


@pytest.fixture(scope="module")
def backends() -> Iterator[dict[str, HFBackend]]:
    made = {
        "roomy": HFBackend(dtype="float32", prefix_cache=8192),
        "tiny": HFBackend(dtype="float32", prefix_cache=96),  # evicts on nearly every insert
        "off": HFBackend(dtype="float32", prefix_cache=False),
    }
    for b in made.values():
        b.start()
    yield made
    for b in made.values():
        b.close()


def _chat(backend: HFBackend, question: str, history: list[dict[str, str]] | None = None) -> list[int]:
    messages = [
        {"role": "system", "content": SYSTEM},
        *(history or []),
        {"role": "user", "content": question},
    ]
    return backend.tokenize(messages)


def test_cached_equals_uncached_equals_solo_generate(
    backends: dict[str, HFBackend], smol_plain: object
) -> None:
    ref = backends["off"]
    first = [NewSequence(i, _chat(ref, q), greedy(16)) for i, q in enumerate(QUESTIONS)]
    outputs: dict[str, dict[int, list[int]]] = {}
    for name, be in backends.items():
        hits = be.prefix_stats.hit_tokens
        res, _ = run_schedule(be, {0: first[:2], 2: first[2:4], 5: first[4:]}, {3: [3]})  # 3 is cancelled
        answers = {i: res[i].tokens for i in (0, 1)}
        second = [
            NewSequence(
                10 + i,
                _chat(
                    be,
                    "And on Sunday?",
                    [
                        {"role": "user", "content": QUESTIONS[i]},
                        {
                            "role": "assistant",
                            "content": be.tokenizer.decode(answers[i], skip_special_tokens=True),
                        },
                    ],
                ),
                greedy(16),
            )
            for i in (0, 1)
        ]
        ids = list(first[0].prompt_ids)
        skipped = NewSequence(200, ids[:-4] + ids[-3:], greedy(16))  # diverges inside a block
        res2, steps2 = run_schedule(be, {0: second[:1], 1: first[:1], 2: [skipped], 3: second[1:]})
        if name == "roomy":  # token-exact reuse, ending inside a block's head
            assert (len(ids) - 4) % 8 and steps2[2].cached_tokens == len(ids) - 4
        got = {i: r.tokens for i, r in res.items()} | {i: r.tokens for i, r in res2.items() if i >= 10}
        got[100] = res2[0].tokens  # the first question again, its whole prompt cached
        for s in [*first, *second, skipped]:
            want = solo_greedy(ref, s.prompt_ids, 16, smol_plain)
            assert got[s.seq_id] == want[: len(got[s.seq_id])], (name, s.seq_id)
        assert got[100] == got[0], name
        outputs[name] = got
        if name == "off":
            assert be.prefix_stats.hit_tokens == 0
        else:
            assert be.prefix_stats.hit_tokens - hits >= 8 * 8, name  # the system prompt, shared
    assert backends["tiny"].prefix_stats.evictions > 0
    assert outputs["roomy"] == outputs["tiny"] == outputs["off"]
