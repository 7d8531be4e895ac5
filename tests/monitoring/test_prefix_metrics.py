"""The prefix cache's metrics (evictions, tokens held, capacity) in the real Prometheus exposition
of a batcher over the shipped FakeBackend, whose cache is small enough here to evict."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.parser import text_string_to_metric_families

from batcher import BatchConfig, Batcher
from batcher.testing import FakeBackend


def samples(registry: CollectorRegistry) -> dict[str, list[tuple[dict[str, str], float]]]:
    text = generate_latest(registry).decode()
    out: dict[str, list[tuple[dict[str, str], float]]] = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            out.setdefault(s.name, []).append((s.labels, s.value))
    return out


async def test_evictions_and_occupancy_are_exported_with_the_model_label() -> None:
    backend = FakeBackend(model_name="cached-model", prefix_cache_tokens=64)  # 8 blocks of 8
    registry = CollectorRegistry()
    async with Batcher(backend, BatchConfig(max_batch_size=4), registry=registry) as b:
        first = samples(registry)
        for topic in range(6):  # 6 prompts of 4 blocks each: the 8-block pool must evict
            await b.generate(" ".join(f"w{topic}x{i}" for i in range(33)), max_tokens=2)
        got = samples(registry)
    labels = {"model": "cached-model", "engine": "0"}
    assert first["batcher_prefix_cache_capacity_tokens"] == [(labels, 64.0)]
    assert first["batcher_prefix_cache_tokens"] == [(labels, 0.0)]
    assert first["batcher_prefix_cache_evictions_total"] == [(labels, 0.0)]
    stats = backend.prefix_stats
    assert stats.evictions >= 6 * 4 - 8
    assert got["batcher_prefix_cache_evictions_total"] == [(labels, float(stats.evictions))]
    assert got["batcher_prefix_cache_tokens"] == [(labels, float(backend.cached_tokens))]
    assert backend.cached_tokens == 64.0  # full
    assert got["batcher_prefix_cache_capacity_tokens"] == [(labels, 64.0)]


async def test_a_backend_without_a_prefix_cache_exports_no_prefix_series() -> None:
    registry = CollectorRegistry()
    async with Batcher(FakeBackend(prefix_cache_tokens=0), BatchConfig(), registry=registry) as b:
        await b.generate("hello there", max_tokens=2)
        got = samples(registry)
    assert not any(name.startswith("batcher_prefix_cache") for name in got)
    assert got["batcher_cached_tokens_total"][0][1] == 0.0
