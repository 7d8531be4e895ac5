"""Plain, cheap statistics kept by the engines on the event loop thread.

The hot paths (one observation per token) update Python ints and bucket lists; nothing is
exported until somebody asks: :mod:`batcher._metrics` turns an engine's :class:`EngineReport` into
Prometheus families at scrape time, and :func:`merge` makes the :class:`BatcherStats` snapshot.
"""

from __future__ import annotations

from bisect import bisect_left
from collections import deque
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

from ._types import OUTCOMES, Outcome

__all__ = [
    "OTHER_TENANTS",
    "BatcherStats",
    "DrainRate",
    "EngineReport",
    "EngineStats",
    "Histogram",
    "PrefixCacheUsage",
    "TenantCounts",
    "TenantTally",
    "merge",
]

LATENCY_BUCKETS = (
    0.001,
    0.0025,
    0.005,
    0.01,
    0.025,
    0.05,
    0.075,
    0.1,
    0.15,
    0.25,
    0.5,
    0.75,
    1.0,
    1.5,
    2.5,
    5.0,
    7.5,
    10.0,
    20.0,
    30.0,
    60.0,
    120.0,
)
SIZE_BUCKETS = (1, 2, 4, 8, 12, 16, 24, 32, 48, 64, 96, 128, 192, 256, 512)
TOKEN_BUCKETS = (1, 4, 16, 32, 64, 128, 256, 512, 1024, 2048, 4096, 8192, 16384, 32768)


class Histogram:
    """Fixed-bucket histogram: ``counts[i]`` holds observations ``<= bounds[i]``, the last ``+Inf``."""

    __slots__ = ("bounds", "counts", "sum")

    def __init__(self, bounds: Sequence[float]) -> None:
        self.bounds = tuple(bounds)
        self.counts = [0] * (len(self.bounds) + 1)
        self.sum = 0.0

    def observe(self, value: float) -> None:
        self.counts[bisect_left(self.bounds, value)] += 1
        self.sum += value

    def observe_many(self, value: float, n: int) -> None:
        self.counts[bisect_left(self.bounds, value)] += n
        self.sum += value * n

    @property
    def count(self) -> int:
        return sum(self.counts)

    def quantile(self, q: float) -> float:
        """Estimate a quantile the way PromQL's ``histogram_quantile`` does (linear in a bucket)."""
        total = self.count
        if total == 0:
            return float("nan")
        rank, seen = q * total, 0
        for i, c in enumerate(self.counts):
            if seen + c >= rank and c:
                if i == len(self.bounds):
                    return self.bounds[-1]
                lo = self.bounds[i - 1] if i else 0.0
                return lo + (self.bounds[i] - lo) * (rank - seen) / c
            seen += c
        return self.bounds[-1]


#: The ``tenant`` label of every tenant not among the top k.
OTHER_TENANTS = "other"


class TenantCounts:
    """One tenant's (or "other"'s) tokens generated and requests ended, by outcome."""

    __slots__ = ("outcomes", "tokens")

    def __init__(self) -> None:
        self.tokens = 0
        self.outcomes: dict[Outcome, int] = dict.fromkeys(OUTCOMES, 0)

    def absorb(self, other: TenantCounts) -> None:
        self.tokens += other.tokens
        for k, v in other.outcomes.items():
            self.outcomes[k] += v


class TenantTally:
    """Per-tenant counts for at most ``k`` tenants by name, the heaviest by tokens; the rest are
    summed as :data:`OTHER_TENANTS`, so cardinality stays bounded whatever names clients send.

    Exported counters stay monotonic: a tenant that comes to weigh twice the lightest named one
    takes its name slot and starts its own series at 0 (what it had stays in "other"); the one it
    displaces adds its counts to "other". Scores of unnamed tenants are kept for at most ``8 * k``
    of them (the heaviest).
    """

    __slots__ = ("_score", "k", "named", "other")

    def __init__(self, k: int) -> None:
        self.k = k
        self.named: dict[str, TenantCounts] = {}
        self.other = TenantCounts()
        self._score: dict[str, int] = {}

    def ended(self, tenant: str, outcome: Outcome, tokens: int = 0) -> None:
        """A request of ``tenant`` ended with ``outcome`` after ``tokens`` generated tokens (they
        count when the request ends, off the per-token path)."""
        if tokens:
            self._score[tenant] = self._score.get(tenant, 0) + tokens
        counts = self._counts(tenant)
        counts.tokens += tokens
        counts.outcomes[outcome] += 1

    def _counts(self, tenant: str) -> TenantCounts:
        counts = self.named.get(tenant)
        if counts is not None:
            return counts
        if tenant == OTHER_TENANTS:  # a tenant of that name shares the label
            return self.other
        score = self._score
        if len(self.named) >= self.k:
            lightest = min(self.named, key=lambda t: score.get(t, 0))
            if score.get(tenant, 0) <= 2 * score.get(lightest, 0):
                self._bound_scores()
                return self.other
            self.other.absorb(self.named.pop(lightest))
        counts = self.named[tenant] = TenantCounts()
        return counts

    def _bound_scores(self) -> None:
        if len(self._score) > 9 * self.k:
            unnamed = sorted((t for t in self._score if t not in self.named), key=self._score.__getitem__)
            for t in unnamed[: len(unnamed) - 4 * self.k]:
                del self._score[t]

    def rows(self) -> list[tuple[str, TenantCounts]]:
        """Every named tenant, then "other"."""
        return [*self.named.items(), (OTHER_TENANTS, self.other)]


class PrefixCacheUsage:
    """A backend's prefix cache as last read: tokens it holds, its capacity in tokens (0: the
    backend has none) and blocks evicted so far.

    Read off the backend on the event loop after each step, from the attributes a backend with
    a prefix cache exposes (``HFBackend``, ``FakeBackend``): ``prefix_cache_tokens`` (capacity),
    ``cached_tokens`` (held now) and ``prefix_stats.evictions``. Plain reads of ints the device
    thread writes; a value is at most one step old.
    """

    __slots__ = ("capacity", "evictions", "held")

    def __init__(self) -> None:
        self.held = self.capacity = self.evictions = 0

    def read(self, backend: object) -> None:
        capacity = getattr(backend, "prefix_cache_tokens", 0)
        if not isinstance(capacity, int) or capacity <= 0:
            return
        self.capacity = capacity
        self.held = int(getattr(backend, "cached_tokens", 0))
        self.evictions = int(getattr(getattr(backend, "prefix_stats", None), "evictions", 0))


@dataclass
class EngineStats:
    """Counters and histograms of one engine. Written only on the event loop thread."""

    batch_size: Histogram = field(default_factory=lambda: Histogram(SIZE_BUCKETS))
    batch_tokens: Histogram = field(default_factory=lambda: Histogram(TOKEN_BUCKETS))
    queue_wait: Histogram = field(default_factory=lambda: Histogram(LATENCY_BUCKETS))
    ttft: Histogram = field(default_factory=lambda: Histogram(LATENCY_BUCKETS))
    itl: Histogram = field(default_factory=lambda: Histogram(LATENCY_BUCKETS))
    duration: Histogram = field(default_factory=lambda: Histogram(LATENCY_BUCKETS))
    step_duration: Histogram = field(default_factory=lambda: Histogram(LATENCY_BUCKETS))
    outcomes: dict[Outcome, int] = field(default_factory=lambda: dict.fromkeys(OUTCOMES, 0))
    generated_tokens: int = 0
    prompt_tokens: int = 0
    computed_tokens: int = 0
    padding_tokens: int = 0
    cached_tokens: int = 0  # prompt tokens a backend's prefix cache served
    prefix_cache: PrefixCacheUsage = field(default_factory=PrefixCacheUsage)
    busy_seconds: float = 0.0
    steps: int = 0
    step_splits: int = 0  # failed steps retried on smaller batches (batcher._faults)
    interrupted_steps: int = 0  # steps a newcomer stopped early (``GenerationBackend.interrupt``)
    tenants: TenantTally = field(default_factory=lambda: TenantTally(10))

    def count(
        self, outcome: Outcome, duration: float | None = None, tenant: str | None = None, tokens: int = 0
    ) -> None:
        """One request (of ``tenant``, if known) ended or was refused with ``outcome``,
        ``duration`` after admission, after generating ``tokens``."""
        self.outcomes[outcome] += 1
        if duration is not None:
            self.duration.observe(duration)
        if tenant is not None:
            self.tenants.ended(tenant, outcome, tokens)

    def observe_step(
        self, busy: float, batch: int, computed_tokens: int | None = None, padding_tokens: int = 0
    ) -> None:
        """One step of ``batch`` rows took ``busy`` seconds on the device; ``computed_tokens`` is
        None for a one-shot batch (no tokens), else the token positions it computed."""
        self.steps += 1
        self.busy_seconds += busy
        self.step_duration.observe(busy)
        if batch:
            self.batch_size.observe(batch)
        if computed_tokens is not None:
            self.batch_tokens.observe(computed_tokens or batch)
            self.computed_tokens += computed_tokens
            self.padding_tokens += padding_tokens


@dataclass(frozen=True, slots=True)
class EngineReport:
    """One engine as :meth:`Batcher.engine_stats` reports it: its name (the ``engine`` metric
    label), its queue and running batch now, and its statistics (live: read, never write)."""

    name: str
    queue_depth: int
    running: int
    stats: EngineStats
    tenant_queues: Mapping[str, int] = field(default_factory=dict)  # queued requests by tenant


class DrainRate:
    """Events per second over a sliding window: requests leaving the queue, tokens delivered,
    requests arriving (the bases of ``retry_after``, and of the batch window)."""

    __slots__ = ("_events", "_total", "_window")

    def __init__(self, window_s: float = 10.0) -> None:
        self._events: deque[tuple[float, int]] = deque()
        self._window = window_s
        self._total = 0

    def record(self, now: float, n: int) -> None:
        if n:
            self._events.append((now, n))
            self._total += n
        self._trim(now)

    def per_second(self, now: float) -> float:
        """Events per second since the first in the window (which opens the span, so it is not
        counted in it); with a single event, that event over at least 50 ms."""
        self._trim(now)
        if not self._events:
            return 0.0
        first_at, first_n = self._events[0]
        if len(self._events) > 1 and now > first_at:
            return (self._total - first_n) / (now - first_at)
        return self._total / max(now - first_at, 0.05)

    def _trim(self, now: float) -> None:
        while self._events and now - self._events[0][0] > self._window:
            self._total -= self._events.popleft()[1]


@dataclass(frozen=True)
class BatcherStats:
    """A snapshot of a batcher, summed over its engines (see :meth:`Batcher.stats`)."""

    queue_depth: int
    running: int
    outcomes: dict[Outcome, int]
    generated_tokens: int
    prompt_tokens: int
    steps: int
    busy_seconds: float
    mean_batch_size: float
    ttft_p50: float
    ttft_p99: float
    tenant_tokens: dict[str, int]  # tokens of ended requests by tenant: top k by name, then "other"


def merge(reports: Sequence[EngineReport]) -> BatcherStats:
    """Sum the engines' statistics into one snapshot (quantiles from the summed histograms)."""
    every = [r.stats for r in reports]
    first = every[0]
    ttft, batch = Histogram(first.ttft.bounds), Histogram(first.batch_size.bounds)
    for s in every:
        ttft.counts = [a + b for a, b in zip(ttft.counts, s.ttft.counts, strict=True)]
        batch.counts = [a + b for a, b in zip(batch.counts, s.batch_size.counts, strict=True)]
        batch.sum += s.batch_size.sum
    return BatcherStats(
        queue_depth=sum(r.queue_depth for r in reports),
        running=sum(r.running for r in reports),
        outcomes={k: sum(s.outcomes[k] for s in every) for k in first.outcomes},
        generated_tokens=sum(s.generated_tokens for s in every),
        prompt_tokens=sum(s.prompt_tokens for s in every),
        steps=sum(s.steps for s in every),
        busy_seconds=sum(s.busy_seconds for s in every),
        mean_batch_size=batch.sum / batch.count if batch.count else 0.0,
        ttft_p50=ttft.quantile(0.5),
        ttft_p99=ttft.quantile(0.99),
        tenant_tokens=_tenant_tokens(every),
    )


def _tenant_tokens(every: Sequence[EngineStats]) -> dict[str, int]:
    tokens: dict[str, int] = {}
    for s in every:
        for tenant, counts in s.tenants.rows():
            tokens[tenant] = tokens.get(tenant, 0) + counts.tokens
    return tokens
