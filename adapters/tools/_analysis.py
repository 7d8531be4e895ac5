"""The numbers behind ``bench``: percentiles, speedup laws and their least-squares fits, SLO advice.

Pure Python, no I/O, no numpy: everything here is checked on synthetic data by the tests.

Amdahl: ``S(N) = 1 / ((1 - P) + P / N)``: a fixed job split over N workers; the serial fraction
``1 - P`` caps the speedup at ``1 / (1 - P)``. Gustafson: ``S(N) = N - (1 - P)(N - 1)``: the job
grows with N; the speedup is a line of slope P. A batching server is measured the Amdahl way
(tokens/s at N concurrent requests over tokens/s alone); a step costing ``a + b·B`` for a batch of
B gives exactly Amdahl's curve with ``P = a / (a + b)``, so the fitted P reads as "the share of a
lone request's step that batching shares out".
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

__all__ = [
    "PERCENTILES",
    "Fit",
    "LevelSummary",
    "Recommendation",
    "amdahl",
    "fit_amdahl",
    "fit_gustafson",
    "gustafson",
    "percentile",
    "percentiles",
    "recommend",
]

#: The percentiles every latency is reported at.
PERCENTILES = (50, 90, 99)

_GOLDEN = (math.sqrt(5) - 1) / 2


def amdahl(n: float, p: float) -> float:
    """Amdahl's speedup at ``n`` workers with parallel fraction ``p``."""
    return 1.0 / ((1.0 - p) + p / n)


def gustafson(n: float, p: float) -> float:
    """Gustafson's scaled speedup at ``n`` workers with parallel fraction ``p``."""
    return n - (1.0 - p) * (n - 1.0)


@dataclass(frozen=True, slots=True)
class Fit:
    """A least-squares fit of one law: the parallel fraction ``p`` in [0, 1] and the root mean
    square error of the fitted speedups."""

    law: str
    p: float
    rmse: float

    @property
    def serial(self) -> float:
        return 1.0 - self.p

    @property
    def max_speedup(self) -> float:
        """Amdahl's ceiling ``1 / (1 - P)`` (infinite for P = 1; Gustafson has none)."""
        if self.law != "amdahl" or self.serial <= 0:
            return math.inf
        return 1.0 / self.serial


def _rmse(law: str, ns: Sequence[float], speedups: Sequence[float], p: float) -> float:
    f = amdahl if law == "amdahl" else gustafson
    return math.sqrt(sum((s - f(n, p)) ** 2 for n, s in zip(ns, speedups, strict=True)) / len(ns))


def _check(ns: Sequence[float], speedups: Sequence[float]) -> None:
    if len(ns) != len(speedups) or not ns:
        raise ValueError(f"need as many speedups as levels, and at least one: {len(ns)} vs {len(speedups)}")
    if any(n < 1 for n in ns):
        raise ValueError(f"concurrency levels must be >= 1, got {list(ns)}")


def fit_amdahl(ns: Sequence[float], speedups: Sequence[float]) -> Fit:
    """Amdahl's P minimising the squared error of the speedups themselves (not of 1/S), over [0, 1].

    The error is not convex in P, so a grid of 1,001 points finds the basin and a golden-section
    search refines it to ~1e-12.
    """
    _check(ns, speedups)

    def sse(p: float) -> float:
        return sum((s - amdahl(n, p)) ** 2 for n, s in zip(ns, speedups, strict=True))

    best = min(range(1001), key=lambda i: sse(i / 1000)) / 1000
    lo, hi = max(0.0, best - 1e-3), min(1.0, best + 1e-3)
    while hi - lo > 1e-12:
        a, b = hi - _GOLDEN * (hi - lo), lo + _GOLDEN * (hi - lo)
        if sse(a) <= sse(b):
            hi = b
        else:
            lo = a
    p = min((lo, hi, best), key=sse)
    return Fit("amdahl", p, _rmse("amdahl", ns, speedups, p))


def fit_gustafson(ns: Sequence[float], speedups: Sequence[float]) -> Fit:
    """Gustafson's P by linear least squares (``S - 1 = P (N - 1)``), clamped to [0, 1]."""
    _check(ns, speedups)
    den = sum((n - 1) ** 2 for n in ns)
    num = sum((s - 1) * (n - 1) for n, s in zip(ns, speedups, strict=True))
    p = min(1.0, max(0.0, num / den)) if den else 1.0
    return Fit("gustafson", p, _rmse("gustafson", ns, speedups, p))


def percentile(xs: Sequence[float], q: float) -> float:
    """The ``q``-th percentile (0-100) with linear interpolation between ranks; NaN when empty."""
    if not xs:
        return math.nan
    s = sorted(xs)
    rank = (len(s) - 1) * q / 100
    lo = math.floor(rank)
    hi = min(lo + 1, len(s) - 1)
    return s[lo] + (s[hi] - s[lo]) * (rank - lo)


def percentiles(xs: Sequence[float]) -> dict[str, float]:
    """``{"p50": ..., "p90": ..., "p99": ...}`` of ``xs``."""
    return {f"p{q}": percentile(xs, q) for q in PERCENTILES}


@dataclass(frozen=True, slots=True)
class LevelSummary:
    """What the SLO advice needs of one concurrency level: N and its latency percentiles (s)."""

    n: int
    tokens_per_s: float
    ttft_s: Mapping[str, float]
    itl_s: Mapping[str, float]


@dataclass(frozen=True, slots=True)
class Recommendation:
    """The largest measured N meeting the SLO (None when none does) and a sentence saying why."""

    max_batch_size: int | None
    reason: str


def recommend(
    levels: Sequence[LevelSummary], *, ttft_s: float | None, itl_s: float | None, pct: int = 90
) -> Recommendation:
    """The largest measured concurrency N such that every level up to N has its TTFT and
    inter-token latency at percentile ``pct`` within ``ttft_s`` and ``itl_s`` (either may be None:
    not constrained). Every level up to N, because under ``max_batch_size=N`` batches of any size
    up to N occur."""
    key = f"p{pct}"
    slo = ", ".join(
        f"{name} p{pct} <= {limit * 1e3:g} ms"
        for name, limit in (("TTFT", ttft_s), ("ITL", itl_s))
        if limit is not None
    )

    def meets(lv: LevelSummary) -> bool:
        return (ttft_s is None or lv.ttft_s[key] <= ttft_s) and (itl_s is None or lv.itl_s[key] <= itl_s)

    ordered = sorted(levels, key=lambda lv: lv.n)
    ok = list(itertools.takewhile(meets, ordered))
    if not ok:
        first = ordered[0]
        return Recommendation(
            None,
            f"no measured level meets {slo}: even at N={first.n} TTFT p{pct} is "
            f"{first.ttft_s[key] * 1e3:.1f} ms and ITL p{pct} {first.itl_s[key] * 1e3:.1f} ms; "
            "use a faster device or a smaller model, or relax the SLO",
        )
    best = ok[-1]
    tail = " (the largest level measured: try a larger --max-batch-size)" if best is ordered[-1] else ""
    return Recommendation(
        best.n,
        f"max_batch_size={best.n} meets {slo} at {best.tokens_per_s:.1f} tok/s "
        f"(TTFT p{pct} {best.ttft_s[key] * 1e3:.1f} ms, ITL p{pct} {best.itl_s[key] * 1e3:.1f} ms){tail}",
    )
