"""Every replica's metrics on one ``/metrics``, each series labelled with its ``replica``.

A replica's batcher and HTTP metrics live in the replica's own registry. Each replica pushes a
snapshot of it (metric families, with ``replica="<replica id>"`` added to every sample) to the
:class:`MetricsHub` deployment every ``metrics_period_s`` and once more when it stops; the front
serves the hub's merge of all of them at ``GET /metrics`` on Serve's HTTP port, so one scrape
target covers the whole deployment. A replica that stops forgets itself; one that dies is dropped
after three periods without a push (its counters then restart under a new ``replica`` value, which
Prometheus's ``rate()`` handles like any process restart).
"""

from __future__ import annotations

import time
from collections.abc import Iterable, Iterator
from typing import Any

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest
from prometheus_client.core import Metric
from ray import serve

__all__ = ["CONTENT_TYPE_LATEST", "MetricsHub", "labelled"]


def labelled(registry: CollectorRegistry, replica: str) -> list[Metric]:
    """A snapshot of ``registry`` with ``replica`` added to every sample's labels."""
    out = []
    for family in registry.collect():
        copy = Metric(family.name, family.documentation, family.type, family.unit)
        copy.samples = [s._replace(labels={**s.labels, "replica": replica}) for s in family.samples]
        out.append(copy)
    return out


class _Merged:
    """A collector yielding one family per metric name, with the samples of every snapshot."""

    def __init__(self, snapshots: Iterable[list[Metric]]) -> None:
        self.snapshots = list(snapshots)

    def collect(self) -> Iterator[Metric]:
        merged: dict[str, Metric] = {}
        for families in self.snapshots:
            for f in families:
                into = merged.setdefault(f.name, Metric(f.name, f.documentation, f.type, f.unit))
                into.samples.extend(f.samples)
        yield from merged.values()


@serve.deployment(
    name="MetricsHub",
    num_replicas=1,
    max_ongoing_requests=1000,
    ray_actor_options={"num_cpus": 0},
)
class MetricsHub:
    """Holds the latest metrics snapshot of each replica; renders their merge for Prometheus."""

    def __init__(self, stale_after_s: float = 3.0) -> None:
        self.stale_after_s = stale_after_s
        self.snapshots: dict[str, tuple[float, list[Metric]]] = {}

    def push(self, replica: str, families: list[Metric]) -> None:
        self.snapshots[replica] = (time.monotonic(), families)

    def forget(self, replica: str) -> None:
        self.snapshots.pop(replica, None)

    def replicas(self) -> list[str]:
        """The replicas with a fresh snapshot, sorted."""
        self._drop_stale()
        return sorted(self.snapshots)

    def render(self) -> bytes:
        """The Prometheus text exposition of every fresh snapshot."""
        self._drop_stale()
        registry = CollectorRegistry(auto_describe=False)
        registry.register(_Merged(families for _, families in self.snapshots.values()))
        return generate_latest(registry)

    def _drop_stale(self) -> None:
        now = time.monotonic()
        for replica, (at, _) in list(self.snapshots.items()):
            if now - at > self.stale_after_s:
                del self.snapshots[replica]


def hub_options(period_s: float) -> dict[str, Any]:
    """``MetricsHub.bind`` arguments for a push period."""
    return {"stale_after_s": 3 * period_s}
