"""The prefix cache (``_prefix``): its block index alone, then on the tiny random Llama (mechanics:
hits, evictions, generated turns, the budget, the off switch), then on the real SmolLM2 in float32
(cached == uncached == solo ``generate`` token for token, with arrivals, cancellations and
evictions in between)."""

from __future__ import annotations

import random
from collections.abc import Iterator, Sequence
from pathlib import Path

import pytest
from batcher.adapters.hf._backend import HFBackend
from batcher.adapters.hf._prefix import PrefixCache

from batcher.backend import NewSequence, PreparedPrompt, PrepareRequest

from .conftest import greedy, run_schedule, solo_greedy

# -- the index alone ---------------------------------------------------------------------------


def test_index_matches_the_longest_shared_prefix_token_for_token() -> None:
    cache = PrefixCache(capacity=8, block=4)
    new = cache.insert(list(range(10)))  # two full blocks; tokens 8, 9 are not a block
    assert [pos for pos, _ in new] == [0, 4]
    first, second = (slot for _, slot in new)
    assert cache.match([*range(8), 99, 98]) == ([first, second], 8)
    assert cache.match([*range(6), 99, 7, 8]) == ([first, second], 6)  # block 2 lends its head
    assert cache.match([*range(4), 99, 5, 6, 7, 8]) == ([first], 4)  # diverges at block 2's start
    assert cache.match([0, 1, 99, 3]) == ([first], 2)  # block 1 lends its head
    assert cache.match([1, 0, 2, 3, 4, 5, 6, 7, 8]) == ([], 0)  # the chain starts at token 0
    assert cache.match(list(range(8))) == ([first, second], 7)  # the last token is always computed
    assert cache.insert(list(range(8))) == []  # already there
    hits, asked = 8 + 6 + 4 + 2 + 0 + 7, 10 + 9 + 9 + 4 + 9 + 8
    assert (cache.stats.hit_tokens, cache.stats.lookup_tokens) == (hits, asked)


def test_a_partial_lender_is_found_among_siblings_and_forgotten_when_evicted() -> None:
    cache = PrefixCache(capacity=3, block=4)
    (_, root), (_, a) = cache.insert([1, 2, 3, 4, 5, 6, 7, 8])
    [(_, b)] = cache.insert([1, 2, 3, 4, 5, 6, 9, 9])  # a sibling of a sharing its first 2 tokens
    assert cache.match([1, 2, 3, 4, 5, 6, 7, 0, 0]) == ([root, a], 7)  # only a has 5, 6, 7
    assert cache.match([1, 2, 3, 4, 5, 6, 9, 0, 0]) == ([root, b], 7)
    assert cache.match([1, 2, 3, 4, 5, 6, 0, 0])[1] == 6  # either sibling lends 5, 6
    cache.match([1, 2, 3, 4, 5, 6, 7, 0, 0])  # a is now the more recent: b is the victim
    cache.insert([20, 21, 22, 23])
    assert cache.stats.evictions == 1
    assert cache.match([1, 2, 3, 4, 5, 6, 9, 0, 0]) == ([root, a], 6)  # [5, 6, 9] went with b; a lent last
    assert cache.peek([1, 2, 3, 4, 5, 6, 9, 0, 0]) == 6


def test_a_head_whose_hash_collides_is_not_lent() -> None:
    # The head index is keyed by hash((parent, tokens)); a colliding entry must be checked against
    # the block's own tokens, or a prompt would get another prompt's keys/values silently.
    cache = PrefixCache(capacity=4, block=4)
    [(_, slot)] = cache.insert([1, 2, 3, 4])
    impostor = cache._heads[hash((0, (1, 2)))]
    cache._heads[hash((0, (7, 8)))] = impostor  # as if (0, (7, 8)) hashed like (0, (1, 2))
    assert cache.match([7, 8, 9, 9]) == ([], 0)
    assert cache.match([1, 2, 9, 9]) == ([slot], 2)


def test_index_evicts_least_recently_used_leaves_within_its_capacity() -> None:
    cache = PrefixCache(capacity=3, block=2)
    a = cache.insert([1, 2, 3, 4])  # chain a: 2 blocks
    b = cache.insert([1, 2, 5, 6])  # shares a's first block: 1 new block
    assert len(a) == 2 and len(b) == 1 and cache.cached_tokens == 6
    cache.match([1, 2, 3, 4, 0])  # a is now more recent than b
    c = cache.insert([7, 8])  # full: evicts b's leaf, never a's root block
    assert len(c) == 1 and cache.stats.evictions == 1 and cache.cached_tokens == 6
    assert len(cache.match([1, 2, 5, 6, 0])[0]) == 1
    assert len(cache.match([1, 2, 3, 4, 0])[0]) == 2
    long = cache.insert(list(range(100, 120)))  # longer than the pool: stops, keeps its own chain
    assert 1 <= len(long) <= 3 and cache.cached_tokens <= 6


def test_peek_says_what_match_would_reuse_without_touching_order_or_stats() -> None:
    cache = PrefixCache(capacity=3, block=2)
    cache.insert([1, 2, 3, 4])
    cache.insert([5, 6])  # now more recent than [1, 2, 3, 4]
    stats = (cache.stats.lookup_tokens, cache.stats.hit_tokens)
    assert cache.peek([1, 2, 3, 4, 9]) == 4 and cache.peek([7, 8, 9]) == 0
    assert cache.peek([1, 2, 3, 4]) == 3  # block [3, 4] lends its head: the last token is computed
    assert (cache.stats.lookup_tokens, cache.stats.hit_tokens) == stats
    cache.insert([7, 8])  # the peeks did not refresh [1, 2, 3, 4]: its leaf is the victim
    assert cache.peek([1, 2, 3, 4, 9]) == 2 and cache.peek([5, 6, 0]) == 2  # [3, 4] went: no lender


def test_peek_from_another_thread_while_the_cache_churns() -> None:
    import threading

    cache = PrefixCache(capacity=16, block=4)
    prompts = [[p % 5, *range(p % 3, p % 3 + 40)] for p in range(60)]
    stop = threading.Event()
    seen: list[int] = []

    def churn() -> None:  # the device thread: lookups, inserts, evictions
        while not stop.is_set():
            for p in prompts:
                cache.match(p)
                cache.insert(p)

    device = threading.Thread(target=churn)
    device.start()
    try:
        for _ in range(200):
            seen += [cache.peek(p) for p in prompts]
    finally:
        stop.set()
        device.join()
    assert all(0 <= n <= 40 for n in seen) and any(seen)
    assert cache.stats.evictions > 0
    for p in prompts:  # quiet again: a peek equals what a lookup then reuses
        assert cache.peek(p) == cache.match(p)[1]


# -- the tiny random Llama ------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny_small_cache(tiny_dir: Path) -> Iterator[HFBackend]:
    backend = HFBackend(str(tiny_dir), dtype="float32", model_name="tiny", prefix_cache=64)
    backend.start()
    yield backend
    backend.close()


def _prompt(rng: random.Random, n: int) -> list[int]:
    return [rng.randrange(300, 40_000) for _ in range(n)]


def _check_against_solo(backend: HFBackend, seqs: Sequence[NewSequence], results: dict) -> None:  # type: ignore[type-arg]
    for s in seqs:
        want = solo_greedy(backend, s.prompt_ids, s.params.max_tokens)
        got = results[s.seq_id].tokens
        assert got == want[: len(got)], s.seq_id  # a cancelled sequence: a prefix of its solo run


def test_shared_prefixes_hit_and_match_solo_generate_with_evictions(tiny_small_cache: HFBackend) -> None:
    be, rng = tiny_small_cache, random.Random(5)
    system = _prompt(rng, 30)
    seqs = [NewSequence(100 + i, system + _prompt(rng, rng.randrange(1, 12)), greedy(10)) for i in range(8)]
    before = be.prefix_stats.hit_tokens, be.prefix_stats.evictions
    results, steps = run_schedule(be, {0: seqs[:1], 1: seqs[1:3], 4: seqs[3:6], 6: seqs[6:]}, {5: [104]})
    _check_against_solo(be, seqs, results)
    assert be.prefix_stats.hit_tokens - before[0] >= 7 * 24  # 3 blocks of the system prompt each
    assert steps[1].computed_tokens < sum(len(s.prompt_ids) for s in seqs[1:3])
    assert be.prefix_stats.evictions > before[1]  # 64 tokens of pool: the turns pushed blocks out
    assert be.cached_tokens <= 64


def test_turn_k_plus_1_reuses_turn_k_and_its_answer(tiny_small_cache: HFBackend) -> None:
    be, rng = tiny_small_cache, random.Random(6)
    history = _prompt(rng, 12)
    for turn in range(4):
        seq = NewSequence(200 + turn, history, greedy(9))
        hits = be.prefix_stats.hit_tokens
        results, steps = run_schedule(be, {0: [seq]})
        assert results[seq.seq_id].tokens == solo_greedy(be, history, 9)
        if turn:  # the previous prompt and all but the last generated token were cached
            assert be.prefix_stats.hit_tokens - hits >= (len(history) - 1) // 8 * 8 - 16
            assert steps[0].computed_tokens <= len(history) - (len(history) - 1) // 8 * 8 + 16
        history = history + results[seq.seq_id].tokens + _prompt(rng, 3)


def test_a_newcomers_blocks_are_stored_after_its_first_token_and_reused_in_the_next_step(
    tiny_small_cache: HFBackend,
) -> None:
    """Storing a prompt's blocks is kept off the way to its first token: the step that admits it
    returns first, the next step stores them (before planning its own newcomers, which reuse
    them), and a sequence that ends at once is stored as it leaves."""
    be, rng = tiny_small_cache, random.Random(8)
    prompt = _prompt(rng, 40)
    held = be.cached_tokens
    first = be.step([NewSequence(300, prompt, greedy(5))], ())
    assert first.outputs and be.cached_tokens == held  # not yet: its first token came first
    twin = NewSequence(301, prompt[:32] + _prompt(rng, 4), greedy(5))
    second = be.step([twin], ())
    assert second.cached_tokens == 32  # the first's four blocks, stored as this step began
    once = _prompt(rng, 17)
    results, _ = run_schedule(be, {0: [NewSequence(302, once, greedy(1))]}, {0: [300, 301]})
    assert results[302].finish == "length"
    assert be._cache is not None and be._cache.peek(once) == 16  # stored as it left, in its step


def test_prepare_hints_the_prefix_the_next_step_reuses(tiny_dir: Path) -> None:
    be = HFBackend(str(tiny_dir), dtype="float32", model_name="tiny", prefix_cache=256)
    be.start()
    try:
        system = "You answer in French, briefly, and politely. " * 4
        (first,) = be.prepare([PrepareRequest(system + "Hello?", greedy(2))])
        assert isinstance(first, PreparedPrompt) and first.cached_tokens == 0
        run_schedule(be, {0: [NewSequence(1, first.token_ids, greedy(2))]})
        stats = (be.prefix_stats.lookup_tokens, be.prefix_stats.hit_tokens)
        (second,) = be.prepare([PrepareRequest(system + "Why?", greedy(2))])
        assert isinstance(second, PreparedPrompt) and second.cached_tokens >= 24
        assert (be.prefix_stats.lookup_tokens, be.prefix_stats.hit_tokens) == stats  # a peek
        _, steps = run_schedule(be, {0: [NewSequence(2, second.token_ids, greedy(2))]})
        assert steps[0].cached_tokens == second.cached_tokens
    finally:
        be.close()


def test_the_pool_is_inside_the_kv_budget_and_can_be_turned_off(tiny_dir: Path) -> None:
    on = HFBackend(str(tiny_dir), dtype="float32", kv_memory_gb=0.01, prefix_cache=True)
    off = HFBackend(str(tiny_dir), dtype="float32", kv_memory_gb=0.01, prefix_cache=False)
    assert on.prefix_cache_tokens > 0 and off.prefix_cache_tokens == 0
    pool = on.prefix_cache_tokens * on.kv_bytes_per_token
    assert on.max_batch_tokens == (on.kv_memory_bytes - pool) // (2 * on.kv_bytes_per_token)
    assert off.max_batch_tokens == off.kv_memory_bytes // (2 * off.kv_bytes_per_token)
    off.start()
    try:
        ids = list(range(1000, 1040))
        for k in range(2):  # the same prompt twice: computed in full both times
            _, steps = run_schedule(off, {0: [NewSequence(k, ids, greedy(2))]})
            assert steps[0].computed_tokens == 40
        assert off.prefix_stats.lookup_tokens == 0 and off.cached_tokens == 0
    finally:
        off.close()


async def test_cached_tokens_reach_the_batchers_prometheus_counter(tiny_dir: Path) -> None:
    from prometheus_client import CollectorRegistry, generate_latest
    from prometheus_client.parser import text_string_to_metric_families

    from batcher import BatchConfig, Batcher

    backend = HFBackend(str(tiny_dir), dtype="float32", model_name="tiny", prefix_cache=256)
    reg = CollectorRegistry()
    system = {"role": "system", "content": "You answer in French, briefly, and politely. " * 4}
    async with Batcher(backend, BatchConfig(max_batch_size=4), registry=reg) as b:
        for q in ("Hello?", "Why?", "Where?"):  # one at a time: each reuses the earlier ones' prefix
            await b.generate([system, {"role": "user", "content": q}], max_tokens=3)
        text = generate_latest(reg).decode()
    families = {f.name: f for f in text_string_to_metric_families(text)}
    cached = sum(s.value for s in families["batcher_cached_tokens"].samples if s.name.endswith("_total"))
    assert cached == backend.prefix_stats.hit_tokens >= 2 * 40
