"""Prometheus export of a batcher's statistics, on a registry the caller passes in.

The engines keep plain counters and bucket lists (:mod:`batcher._stats`), cheap on the per-token
path; this collector turns them into metric families only when Prometheus scrapes. Several
batchers may share one registry (one collector per registry serves them all, told apart by the
``model`` and ``engine`` labels); each batcher's series leave when it closes.

``prometheus_client`` is imported here, on first use, never by ``import batcher``: its import
creates the global default registry, a side effect a library must not impose.
"""

from __future__ import annotations

import threading
import weakref
from collections.abc import Callable, Iterator, Sequence
from typing import Any, Protocol

from ._config import BatchConfig
from ._stats import OTHER_TENANTS, EngineReport, Histogram
from ._types import OUTCOMES

__all__ = ["Source", "attach", "detach"]


class Source(Protocol):
    """What the collector reads of a batcher: public attributes only."""

    @property
    def model_name(self) -> str: ...
    @property
    def config(self) -> BatchConfig: ...
    def engine_stats(self) -> Sequence[EngineReport]: ...


_collectors: weakref.WeakKeyDictionary[Any, _Collector] = weakref.WeakKeyDictionary()
_lock = threading.Lock()

_LABELS = ["model", "engine"]
#: One exported engine: the batcher's model name and config, and the engine's report.
_Row = tuple[str, BatchConfig, EngineReport]
_GAUGES: tuple[tuple[str, str, Callable[[EngineReport, BatchConfig], float]], ...] = (
    ("batcher_queue_depth", "Requests admitted and waiting to run.", lambda e, c: e.queue_depth),
    ("batcher_running_requests", "Requests in the running batch.", lambda e, c: e.running),
    ("batcher_max_queue", "Configured max_queue (per batcher).", lambda e, c: c.max_queue),
    ("batcher_max_batch_size", "Configured max_batch_size.", lambda e, c: c.max_batch_size),
)
_HISTOGRAMS = (
    ("batcher_batch_size", "batch_size", "Sequences (or one-shot items) per step."),
    ("batcher_batch_tokens", "batch_tokens", "Token positions computed per step, padding included."),
    ("batcher_queue_wait_seconds", "queue_wait", "Time from admission to joining a batch."),
    ("batcher_time_to_first_token_seconds", "ttft", "Time from admission to the first token."),
    ("batcher_inter_token_latency_seconds", "itl", "Time between a request's successive tokens."),
    ("batcher_request_duration_seconds", "duration", "Time from admission to the request's end."),
    ("batcher_step_duration_seconds", "step_duration", "Backend time per step (or one-shot batch)."),
)
_COUNTERS = (
    ("batcher_generated_tokens", "generated_tokens", "Tokens generated."),
    ("batcher_prompt_tokens", "prompt_tokens", "Prompt tokens prefilled."),
    ("batcher_computed_tokens", "computed_tokens", "Token positions computed, padding included."),
    ("batcher_padding_tokens", "padding_tokens", "Token positions computed for padding (waste)."),
    ("batcher_cached_tokens", "cached_tokens", "Prompt tokens served from the prefix cache."),
    ("batcher_executor_busy_seconds", "busy_seconds", "Seconds the device thread spent in steps."),
    ("batcher_step_splits", "step_splits", "Failed steps retried on smaller batches (fault isolation)."),
    (
        "batcher_interrupted_steps",
        "interrupted_steps",
        "Decode steps stopped early so that a newcomer joins sooner (their work is redone).",
    ),
)


def attach(registry: Any, batcher: Source) -> None:
    """Export ``batcher``'s statistics on ``registry`` (a prometheus_client CollectorRegistry)."""
    with _lock:
        collector = _collectors.get(registry)
        if collector is None:
            collector = _collectors[registry] = _Collector()
            registry.register(collector)  # a prometheus_client.CollectorRegistry
        collector.batchers.add(batcher)


def detach(registry: Any, batcher: Source) -> None:
    with _lock:
        collector = _collectors.get(registry)
        if collector is not None:
            collector.batchers.discard(batcher)


class _Collector:
    def __init__(self) -> None:
        self.batchers: weakref.WeakSet[Source] = weakref.WeakSet()

    def describe(self) -> list[Any]:
        return list(self._families([]))

    def collect(self) -> Iterator[Any]:
        with _lock:
            batchers = list(self.batchers)
        yield from self._families([(b.model_name, b.config, e) for b in batchers for e in b.engine_stats()])

    @staticmethod
    def _families(rows: list[_Row]) -> Iterator[Any]:
        from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily

        for name, doc, get in _GAUGES:
            g = GaugeMetricFamily(name, doc, labels=_LABELS)
            for model, config, e in rows:
                g.add_metric([model, e.name], float(get(e, config)))
            yield g
        requests = CounterMetricFamily(
            "batcher_requests", "Requests by how they ended.", labels=[*_LABELS, "outcome"]
        )
        for model, _, e in rows:
            for outcome in OUTCOMES:
                requests.add_metric([model, e.name, outcome], e.stats.outcomes[outcome])
        yield requests
        for name, attr, doc in _COUNTERS:
            c = CounterMetricFamily(name, doc, labels=_LABELS)
            for model, _, e in rows:
                c.add_metric([model, e.name], float(getattr(e.stats, attr)))
            yield c
        yield from _tenant_families(rows)
        yield from _prefix_cache_families(rows)
        for name, attr, doc in _HISTOGRAMS:
            h = HistogramMetricFamily(name, doc, labels=_LABELS)
            for model, _, e in rows:
                hist: Histogram = getattr(e.stats, attr)
                h.add_metric([model, e.name], _buckets(hist), hist.sum)
            yield h


def _tenant_families(rows: list[_Row]) -> Iterator[Any]:
    """Per tenant: the top k by name, the rest as ``tenant="other"`` (see ``TenantTally``)."""
    from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

    labels = [*_LABELS, "tenant"]
    tokens = CounterMetricFamily(
        "batcher_tenant_generated_tokens",
        "Tokens generated, by tenant (counted when each request ends).",
        labels=labels,
    )
    requests = CounterMetricFamily(
        "batcher_tenant_requests", "Requests by tenant and how they ended.", labels=[*labels, "outcome"]
    )
    queued = GaugeMetricFamily(
        "batcher_tenant_queue_depth", "Requests waiting to run, by tenant.", labels=labels
    )
    for model, _, e in rows:
        tally = e.stats.tenants
        other_queued = sum(n for t, n in e.tenant_queues.items() if t not in tally.named)
        for tenant, counts in tally.rows():
            tokens.add_metric([model, e.name, tenant], float(counts.tokens))
            for outcome in OUTCOMES:
                requests.add_metric([model, e.name, tenant, outcome], counts.outcomes[outcome])
            n = other_queued if tenant == OTHER_TENANTS else e.tenant_queues.get(tenant, 0)
            queued.add_metric([model, e.name, tenant], float(n))
    yield from (tokens, requests, queued)


def _prefix_cache_families(rows: list[_Row]) -> Iterator[Any]:
    """The backend's prefix cache, for engines whose backend has one (see ``PrefixCacheUsage``)."""
    from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

    held = GaugeMetricFamily(
        "batcher_prefix_cache_tokens", "Tokens the backend's prefix cache holds now.", labels=_LABELS
    )
    capacity = GaugeMetricFamily(
        "batcher_prefix_cache_capacity_tokens", "Tokens the backend's prefix cache can hold.", labels=_LABELS
    )
    evictions = CounterMetricFamily(
        "batcher_prefix_cache_evictions",
        "Blocks evicted from the backend's prefix cache (least recently used first).",
        labels=_LABELS,
    )
    for model, _, e in rows:
        usage = e.stats.prefix_cache
        if usage.capacity:
            held.add_metric([model, e.name], float(usage.held))
            capacity.add_metric([model, e.name], float(usage.capacity))
            evictions.add_metric([model, e.name], float(usage.evictions))
    yield from (held, capacity, evictions)


def _buckets(h: Histogram) -> list[tuple[str, float]]:
    out, running = [], 0
    for bound, c in zip((*h.bounds, float("inf")), h.counts, strict=True):
        running += c
        out.append(("+Inf" if bound == float("inf") else repr(float(bound)), float(running)))
    return out
