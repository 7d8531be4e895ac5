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
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING, Any

from ._stats import EngineStats, Histogram
from ._types import OUTCOMES

if TYPE_CHECKING:
    from ._batcher import Batcher

__all__ = ["attach", "detach"]

_collectors: weakref.WeakKeyDictionary[Any, _Collector] = weakref.WeakKeyDictionary()
_lock = threading.Lock()

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
    ("batcher_executor_busy_seconds", "busy_seconds", "Seconds the device thread spent in steps."),
)


def attach(registry: Any, batcher: Batcher) -> None:
    """Export ``batcher``'s statistics on ``registry`` (a prometheus_client CollectorRegistry)."""
    with _lock:
        collector = _collectors.get(registry)
        if collector is None:
            collector = _collectors[registry] = _Collector()
            registry.register(collector)  # a prometheus_client.CollectorRegistry
        collector.batchers.add(batcher)


def detach(registry: Any, batcher: Batcher) -> None:
    with _lock:
        collector = _collectors.get(registry)
        if collector is not None:
            collector.batchers.discard(batcher)


class _Collector:
    def __init__(self) -> None:
        self.batchers: weakref.WeakSet[Batcher] = weakref.WeakSet()

    def describe(self) -> list[Any]:
        return list(self._families([]))

    def collect(self) -> Iterator[Any]:
        with _lock:
            batchers = list(self.batchers)
        rows = [(b.model_name, e.name, e, b) for b in batchers for e in b._engines]
        yield from self._families(rows)

    def _families(self, rows: list[tuple[str, str, Any, Batcher]]) -> Iterator[Any]:
        from prometheus_client.core import (
            CounterMetricFamily,
            GaugeMetricFamily,
            HistogramMetricFamily,
        )

        labels = ["model", "engine"]
        gauges: dict[str, tuple[str, Callable[[Any, Batcher], float]]] = {
            "batcher_queue_depth": ("Requests admitted and waiting to run.", lambda e, b: e.queue_depth),
            "batcher_running_requests": ("Requests in the running batch.", lambda e, b: e.running),
            "batcher_max_queue": ("Configured max_queue (per batcher).", lambda e, b: b.config.max_queue),
            "batcher_max_batch_size": ("Configured max_batch_size.", lambda e, b: b.config.max_batch_size),
        }
        for name, (doc, get) in gauges.items():
            g = GaugeMetricFamily(name, doc, labels=labels)
            for model, engine, e, b in rows:
                g.add_metric([model, engine], float(get(e, b)))
            yield g
        requests = CounterMetricFamily(
            "batcher_requests", "Requests by how they ended.", labels=[*labels, "outcome"]
        )
        for model, engine, e, _ in rows:
            stats: EngineStats = e.stats
            for outcome in OUTCOMES:
                requests.add_metric([model, engine, outcome], stats.outcomes[outcome])
        yield requests
        for name, attr, doc in _COUNTERS:
            c = CounterMetricFamily(name, doc, labels=labels)
            for model, engine, e, _ in rows:
                c.add_metric([model, engine], float(getattr(e.stats, attr)))
            yield c
        for name, attr, doc in _HISTOGRAMS:
            h = HistogramMetricFamily(name, doc, labels=labels)
            for model, engine, e, _ in rows:
                hist: Histogram = getattr(e.stats, attr)
                h.add_metric([model, engine], _buckets(hist), hist.sum)
            yield h


def _buckets(h: Histogram) -> list[tuple[str, float]]:
    out, running = [], 0
    for bound, c in zip((*h.bounds, float("inf")), h.counts, strict=True):
        running += c
        out.append(("+Inf" if bound == float("inf") else repr(float(bound)), float(running)))
    return out
