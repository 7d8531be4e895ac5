"""The fits, percentiles and SLO advice of ``bench``, on synthetic data with known answers."""

from __future__ import annotations

import math
import statistics

import pytest
from batcher.adapters.tools._analysis import (
    LevelSummary,
    amdahl,
    fit_amdahl,
    fit_gustafson,
    gustafson,
    percentile,
    percentiles,
    recommend,
)
from batcher.adapters.tools._bench import concurrency_levels

NS = [1, 2, 4, 8, 16, 32]


@pytest.mark.parametrize("p", [0.0, 0.25, 0.6, 0.9, 0.97, 0.999, 1.0])
def test_amdahl_fit_recovers_the_exact_parallel_fraction(p: float) -> None:
    fit = fit_amdahl(NS, [amdahl(n, p) for n in NS])
    assert fit.p == pytest.approx(p, abs=1e-7)
    assert fit.rmse == pytest.approx(0, abs=1e-6)
    assert fit.serial == pytest.approx(1 - p, abs=1e-7)


@pytest.mark.parametrize("p", [0.0, 0.25, 0.6, 0.9, 1.0])
def test_gustafson_fit_recovers_the_exact_parallel_fraction(p: float) -> None:
    fit = fit_gustafson(NS, [gustafson(n, p) for n in NS])
    assert fit.p == pytest.approx(p, abs=1e-12)
    assert fit.rmse == pytest.approx(0, abs=1e-9)


def test_a_step_costing_a_plus_b_per_row_is_amdahl_with_p_a_over_a_plus_b() -> None:
    # tokens/s at N = N / (a + b N), so S(N) = N (a + b) / (a + b N): Amdahl's law exactly.
    a, b = 0.043, 0.0027
    speedups = [(n / (a + b * n)) / (1 / (a + b)) for n in NS]
    fit = fit_amdahl(NS, speedups)
    assert fit.p == pytest.approx(a / (a + b), abs=1e-7)
    assert fit.max_speedup == pytest.approx((a + b) / b, rel=1e-5)


def test_amdahl_fit_minimises_the_squared_error_of_the_speedups() -> None:
    # Noisy data: the least-squares P beats its neighbours on the error in S (not in 1/S).
    speedups = [1.0, 1.8, 3.1, 5.2, 6.9, 8.8]
    fit = fit_amdahl(NS, speedups)

    def sse(p: float) -> float:
        return sum((s - amdahl(n, p)) ** 2 for n, s in zip(NS, speedups, strict=True))

    assert 0 < fit.p < 1
    assert sse(fit.p) <= min(sse(fit.p - 1e-4), sse(fit.p + 1e-4))
    assert sse(fit.p) < min(sse(i / 100) for i in range(101) if abs(i / 100 - fit.p) > 0.01)
    assert fit.rmse == pytest.approx(math.sqrt(sse(fit.p) / len(NS)))


def test_fits_clamp_to_the_unit_interval() -> None:
    assert fit_amdahl([1, 2, 4], [1.0, 0.9, 0.8]).p == 0.0  # batching slowed it down
    assert fit_gustafson([1, 2, 4], [1.0, 2.5, 5.0]).p == 1.0  # superlinear
    with pytest.raises(ValueError, match="as many"):
        fit_amdahl([1, 2], [1.0])


def test_percentiles_interpolate_linearly() -> None:
    xs = [float(x) for x in range(11)]  # 0..10
    assert percentile(xs, 50) == 5.0
    assert percentile(xs, 90) == 9.0
    assert percentile([4.0, 1.0], 50) == 2.5
    assert percentile([7.0], 99) == 7.0
    assert math.isnan(percentile([], 50))
    data = [3.1, 0.2, 9.9, 4.4, 5.0, 7.3, 1.1]
    assert percentiles(data)["p90"] == pytest.approx(statistics.quantiles(data, n=10, method="inclusive")[8])


def _level(n: int, ttft_ms: float, itl_ms: float) -> LevelSummary:
    return LevelSummary(n, 100.0 * n, {"p90": ttft_ms / 1e3}, {"p90": itl_ms / 1e3})


def test_recommend_takes_the_largest_n_whose_smaller_levels_all_meet_the_slo() -> None:
    levels = [_level(1, 50, 40), _level(2, 60, 45), _level(4, 90, 55), _level(8, 95, 70)]
    assert recommend(levels, ttft_s=None, itl_s=0.050).max_batch_size == 2
    assert recommend(levels, ttft_s=0.1, itl_s=None).max_batch_size == 8
    both = recommend(levels, ttft_s=0.085, itl_s=0.060)
    assert both.max_batch_size == 2
    assert "TTFT p90 <= 85 ms" in both.reason and "ITL p90 <= 60 ms" in both.reason
    # A level that meets it after a smaller one failed does not count: batches of every size up
    # to max_batch_size occur.
    bumpy = [_level(1, 50, 40), _level(2, 60, 80), _level(4, 60, 45)]
    assert recommend(bumpy, ttft_s=None, itl_s=0.050).max_batch_size == 1
    assert "try a larger --max-batch-size" in recommend(levels, ttft_s=1.0, itl_s=None).reason


def test_recommend_says_when_no_level_meets_the_slo() -> None:
    advice = recommend([_level(1, 50, 40), _level(2, 60, 45)], ttft_s=0.010, itl_s=None)
    assert advice.max_batch_size is None
    assert "no measured level meets TTFT p90 <= 10 ms" in advice.reason
    assert "50.0 ms" in advice.reason


def test_concurrency_levels_double_up_to_the_max() -> None:
    assert concurrency_levels(1) == [1]
    assert concurrency_levels(8) == [1, 2, 4, 8]
    assert concurrency_levels(12) == [1, 2, 4, 8, 12]
