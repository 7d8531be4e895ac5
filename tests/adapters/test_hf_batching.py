"""Continuous batching mechanics of HFBackend on a tiny random-weight Llama: merge, filter, trim,
drop, seeds, EOS, failures, memory. Token-for-token equality with solo ``generate`` (fp32)."""

from __future__ import annotations

import gc
import random

import psutil
import pytest
import torch
from batcher.adapters.hf._backend import HFBackend
from batcher.adapters.hf._prefix import chat_prefix

from batcher import InvalidRequest
from batcher.backend import NewSequence, SamplingParams

from .conftest import check_slab, greedy, run_schedule, solo_greedy


def _prompt(rng: random.Random, n: int) -> list[int]:
    return [rng.randrange(200, 40_000) for _ in range(n)]


def test_staggered_arrivals_and_drops_match_solo_generate(tiny: HFBackend) -> None:
    rng = random.Random(1)
    lengths = [3, 40, 7, 1, 25, 60, 12, 33, 5, 18, 2, 50]
    seqs = [NewSequence(i, _prompt(rng, n), greedy(rng.randrange(4, 20))) for i, n in enumerate(lengths)]
    admits = {0: seqs[:3], 2: seqs[3:4], 3: seqs[4:7], 7: seqs[7:8], 9: seqs[8:12]}
    drops = {4: [1], 10: [9, 999], 12: [5]}  # 999: unknown ids are ignored
    results, _ = run_schedule(tiny, admits, drops)
    dropped = {1, 9, 5}
    for s in seqs:
        r = results[s.seq_id]
        expected = solo_greedy(tiny, s.prompt_ids, s.params.max_tokens)
        if s.seq_id in dropped:
            assert r.finish is None
            assert r.tokens == expected[: len(r.tokens)]
        else:
            assert r.tokens == expected, f"sequence {s.seq_id} diverged from its solo run"
            assert r.finish in ("length", "stop")
    assert tiny.live_sequences == 0 and tiny.kv_bytes == 0


def test_each_step_yields_one_token_per_running_sequence(tiny: HFBackend) -> None:
    def step(admit: list[NewSequence]) -> list[tuple[int, int]]:
        return sorted((o.seq_id, len(o.token_ids)) for o in tiny.step(admit, []).outputs)

    assert step([NewSequence(1, [500, 600, 700], greedy(9))]) == [(1, 1)]
    assert step([]) == [(1, 1)]
    # Newcomers ride in the same forward call as the decode rows: arrivals never stall them.
    assert step([NewSequence(2, [800] * 9, greedy(9))]) == [(1, 1), (2, 1)]
    assert step([NewSequence(3, [900], greedy(9)), NewSequence(4, [901, 902], greedy(9))]) == [
        (1, 1),
        (2, 1),
        (3, 1),
        (4, 1),
    ]
    assert step([]) == [(1, 1), (2, 1), (3, 1), (4, 1)]
    tiny.step([], [1, 2, 3, 4])


def test_padding_columns_are_trimmed_when_the_long_row_leaves(tiny: HFBackend) -> None:
    long = NewSequence(1, [300 + i for i in range(80)], greedy(50))
    short = NewSequence(2, [400, 401], greedy(50))
    tiny.step([long, short], [])
    slab = tiny.slab
    assert slab is not None
    assert slab.width == 80
    tiny.step([], [1])  # the long prompt is cancelled: its 78 padding columns go
    assert slab.width == 3  # 2 prompt tokens + 1 decoded
    check_slab(tiny)
    tiny.step([], [2])
    assert tiny.kv_bytes == 0


def test_newcomer_longer_than_the_window_relayouts_the_slab(tiny: HFBackend) -> None:
    a = NewSequence(1, [500, 501], greedy(30))
    b = NewSequence(2, list(range(1000, 1150)), greedy(10))
    results, _ = run_schedule(tiny, {0: [a], 3: [b]})
    assert results[1].tokens == solo_greedy(tiny, a.prompt_ids, 30)
    assert results[2].tokens == solo_greedy(tiny, b.prompt_ids, 10)


def test_computed_tokens_are_the_packed_positions_with_no_padding(tiny: HFBackend) -> None:
    a = NewSequence(1, [500] * 10, greedy(3))
    b = NewSequence(2, [600] * 7, greedy(3))
    # (the prefix cache may hold a head of these prompts from earlier tests: what it serves is not
    # computed)
    res = tiny.step([a, b], [])  # one packed call: 10 + 7 prompt positions, none of them padding
    assert (res.computed_tokens + res.cached_tokens, res.padding_tokens) == (17, 0)
    res = tiny.step([NewSequence(3, [700] * 4, greedy(3))], [])  # 2 decode rows + 4 prompt tokens
    assert (res.computed_tokens + res.cached_tokens, res.padding_tokens) == (6, 0)
    tiny.step([], [1, 2, 3])


def test_chat_prompts_reuse_the_template_prefix_and_match_solo_generate(tiny: HFBackend) -> None:
    prefix = chat_prefix(tiny.tokenizer)  # put into the prefix cache at start
    assert len(prefix) >= 4
    chats = [[{"role": "user", "content": "word " * n}] for n in (1, 9, 30, 4)]
    ids = [tiny.tokenize(c) for c in chats]
    assert all(i[: len(prefix)] == prefix for i in ids)
    seqs = [NewSequence(k, p, greedy(12)) for k, p in enumerate(ids)]
    seqs.append(NewSequence(9, [5000, 5001], greedy(12)))  # no prefix: a plain group
    results, steps = run_schedule(tiny, {0: seqs[:3], 2: seqs[3:]})
    assert steps[0].computed_tokens < sum(len(p) for p in ids[:3])  # the prefix was not recomputed
    for s in seqs:
        assert results[s.seq_id].tokens == solo_greedy(tiny, s.prompt_ids, 12)


def test_seeded_sampling_ignores_batch_companions(tiny: HFBackend) -> None:
    params = SamplingParams(max_tokens=12, temperature=0.9, top_p=0.9, top_k=50, seed=1234)
    target = [700, 701, 702, 703]
    alone, _ = run_schedule(tiny, {0: [NewSequence(1, target, params)]})
    rng = random.Random(3)
    others = [
        NewSequence(10 + i, _prompt(rng, rng.randrange(1, 30)), SamplingParams(max_tokens=20, temperature=1))
        for i in range(6)
    ]
    crowd, _ = run_schedule(tiny, {0: others[:3], 2: [NewSequence(1, target, params)], 3: others[3:]})
    assert crowd[1].tokens == alone[1].tokens
    other_seed = SamplingParams(max_tokens=12, temperature=0.9, top_p=0.9, top_k=50, seed=99)
    diff, _ = run_schedule(tiny, {0: [NewSequence(1, target, other_seed)]})
    assert diff[1].tokens != alone[1].tokens


@pytest.mark.parametrize("top_k, top_p", [(1, 1.0), (0, 1e-6)])
def test_top_k_1_and_tiny_top_p_are_greedy(tiny: HFBackend, top_k: int, top_p: float) -> None:
    prompt = [900, 901, 902]
    params = SamplingParams(max_tokens=8, temperature=1.5, top_k=top_k, top_p=top_p)
    results, _ = run_schedule(tiny, {0: [NewSequence(1, prompt, params)]})
    assert results[1].tokens == solo_greedy(tiny, prompt, 8)


def test_eos_ends_with_stop_and_no_eos_text(tiny: HFBackend, monkeypatch: pytest.MonkeyPatch) -> None:
    prompt = [1200, 1201, 1202]
    expected = solo_greedy(tiny, prompt, 10)
    eos = expected[3]
    monkeypatch.setattr(tiny, "_eos", frozenset({eos}))
    results, _ = run_schedule(tiny, {0: [NewSequence(1, prompt, greedy(10))]})
    r = results[1]
    assert r.finish == "stop"
    assert r.tokens == expected[: expected.index(eos) + 1]
    head = tiny.tokenizer.decode(r.tokens[:-1], skip_special_tokens=True)
    assert r.text == head


def test_max_tokens_ends_with_length(tiny: HFBackend) -> None:
    seqs = [NewSequence(1, [1300], greedy(1)), NewSequence(2, [1301], greedy(4))]
    results, _ = run_schedule(tiny, {0: seqs})
    assert (len(results[1].tokens), results[1].finish) == (1, "length")
    assert (len(results[2].tokens), results[2].finish) == (4, "length")


def test_bad_prompt_ids_fail_only_that_sequence(tiny: HFBackend) -> None:
    good = NewSequence(1, [1400, 1401], greedy(2))
    bad = NewSequence(2, [1400, 10**7], greedy(2))
    res = tiny.step([good, bad], [])
    assert set(res.failed) == {2} and isinstance(res.failed[2], InvalidRequest)
    assert [o.seq_id for o in res.outputs] == [1]
    tiny.step([], [1])


def test_a_failing_step_frees_everything_and_the_next_step_works(
    tiny: HFBackend, monkeypatch: pytest.MonkeyPatch
) -> None:
    tiny.step([NewSequence(1, [1500, 1501], greedy(20))], [])

    def boom(*args: object) -> torch.Tensor:
        raise RuntimeError("injected")

    monkeypatch.setattr(tiny, "_forward", boom)
    with pytest.raises(RuntimeError, match="injected"):
        tiny.step([NewSequence(2, [1600], greedy(3))], [])
    assert tiny.live_sequences == 0 and tiny.kv_bytes == 0
    monkeypatch.undo()
    tiny.step([], [1, 2])  # the engine drops the failed ids: ignored
    results, _ = run_schedule(tiny, {0: [NewSequence(3, [1700], greedy(3))]})
    assert results[3].tokens == solo_greedy(tiny, [1700], 3)


@pytest.mark.slow
def test_memory_returns_to_baseline_over_1600_requests(tiny: HFBackend) -> None:
    rng = random.Random(7)
    proc = psutil.Process()

    def wave(first_id: int, count: int) -> None:
        pending = [
            NewSequence(first_id + i, _prompt(rng, rng.randrange(1, 40)), greedy(rng.randrange(1, 9)))
            for i in range(count)
        ]
        live: list[int] = []
        while pending or tiny.live_sequences:
            k = rng.randrange(0, 6)
            admit, pending = pending[:k], pending[k:]
            drop = [s for s in live if rng.random() < 0.05]
            res = tiny.step(admit, drop)
            live = [s for s in live + [a.seq_id for a in admit] if s not in drop]
            live = [s for s in live if s not in {o.seq_id for o in res.outputs if o.finish_reason}]
        assert tiny.kv_bytes == 0 and tiny.live_sequences == 0

    # Two measures after each wave of 100 requests. (1) The bytes held by every live tensor (found
    # through the garbage collector, each storage counted once): exact, so it must come back to the
    # same figure after every wave -- this is what catches a cache row, a per-sequence tensor or a
    # list of them kept by mistake. (2) RSS, which also sees native memory but moves in allocator
    # steps: the first waves grow while oneDNN and malloc cache kernels and arenas for new shapes
    # (measured: +22, +11, +9, +3 MiB, then steps of 0-4.5 MiB at irregular waves; run alone,
    # with no earlier test having made those shapes, it still grew 18 MiB over waves 6-11), so it
    # is held to a plateau bound over the last 600 of 1,600 requests rather than to a ratio (a
    # ratio of two 4 MiB steps flaked in CI).
    held, rss = [], []
    for n in range(16):
        wave(n * 100, 100)
        gc.collect()
        held.append(_live_tensor_bytes())
        rss.append(proc.memory_info().rss)
    mib = [round(r / 2**20, 1) for r in rss]
    assert held[1:] == [held[1]] * 15, f"tensor bytes held after each wave: {held}"
    late = rss[-1] - rss[9]
    assert late < 16 * 2**20, f"RSS grew by {late / 2**20:.1f} MiB over the last 600 requests: {mib}"


def _live_tensor_bytes() -> int:
    storages: dict[int, int] = {}
    for obj in gc.get_objects():
        if not issubclass(type(obj), torch.Tensor) or obj.is_meta:  # type(): no proxy's __class__
            continue
        if obj.is_mkldnn:  # oneDNN-packed weights have no storage to look at: count them by object
            storages[id(obj)] = obj.numel() * obj.element_size()
            continue
        storage = obj.untyped_storage()
        storages[storage.data_ptr()] = max(storages.get(storage.data_ptr(), 0), storage.nbytes())
    return sum(storages.values())


def test_refuses_sliding_window_models(tmp_path: object, tiny_dir: object) -> None:
    from batcher.adapters.hf._load import check_cache_compatible
    from transformers import MistralConfig

    with pytest.raises(InvalidRequest, match="sliding-window"):
        check_cache_compatible(MistralConfig(sliding_window=4096))
    with pytest.raises(InvalidRequest, match="sliding-window"):
        check_cache_compatible(
            type("C", (), {"layer_types": ["full_attention", "sliding_attention"], "model_type": "x"})()
        )
    check_cache_compatible(MistralConfig(sliding_window=None))
