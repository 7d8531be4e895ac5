"""The step-cost model an engine learns online, and what it predicts.

A step's device time is modelled as ``a + b * rows + c * new_tokens`` (rows: sequences in the
batch; new tokens: prompt tokens prefilled in that step), fitted by least squares over the last
256 steps. It predicts a newcomer's time to first token (how many steps until a slot frees for it,
times the step time, plus the step that prefills it), the engine's drain rate before any has been
measured, and whether an idle engine gains throughput by waiting for a fuller first batch.
Pure arithmetic on the event loop; nothing here touches a request.
"""

from __future__ import annotations

import heapq
import math
from collections import deque
from collections.abc import Iterable

__all__ = ["StepCost", "steps_until_slot"]

#: Steps observed before the model predicts anything.
MIN_STEPS = 8


class StepCost:
    """``time ≈ a + b * rows + c * new_tokens`` by least squares over a window of recent steps."""

    __slots__ = ("_coef", "_steps")

    def __init__(self, window: int = 256) -> None:
        self._steps: deque[tuple[int, int, float]] = deque(maxlen=window)
        self._coef: tuple[float, float, float] | None = None

    @property
    def ready(self) -> bool:
        return len(self._steps) >= MIN_STEPS

    def observe(self, rows: int, new_tokens: int, seconds: float) -> None:
        self._steps.append((rows, new_tokens, seconds))
        self._coef = None

    @property
    def coefficients(self) -> tuple[float, float, float]:
        """``(a, b, c)``; the fit is redone lazily, at most once per observed step."""
        if self._coef is None:
            self._coef = _fit(self._steps)
        return self._coef

    def predict(self, rows: int, new_tokens: float) -> float:
        """Seconds a step of ``rows`` sequences prefilling ``new_tokens`` should take."""
        a, b, c = self.coefficients
        return max(a + b * rows + c * new_tokens, 0.0)

    @property
    def mean_new_tokens(self) -> float:
        """Prompt tokens prefilled per step, on average over the window."""
        return sum(s[1] for s in self._steps) / len(self._steps) if self._steps else 0.0

    def worth_waiting(self, waiting: int, arrivals_per_s: float, wait_s: float) -> bool:
        """Whether an idle engine with ``waiting`` requests serves more per second by waiting
        ``wait_s`` for arrivals to fill its first batch than by starting now."""
        if arrivals_per_s <= 0 or wait_s <= 0:
            return False
        now = waiting / max(self.predict(waiting, 0.0), 1e-9)
        more = waiting + arrivals_per_s * wait_s
        later = more / (wait_s + self.predict(math.ceil(more), 0.0))
        return later > now


def steps_until_slot(needed: int, remaining: Iterable[int], rows: int, mean_tokens: float) -> float:
    """Steps until ``needed`` slots have freed: the running sequences free theirs after their
    ``remaining`` tokens; past those, a full batch of ``rows`` frees ``rows`` slots every
    ``mean_tokens`` steps."""
    if needed <= 0:
        return 0.0
    left = list(remaining)
    if needed <= len(left):
        return float(heapq.nsmallest(needed, left)[-1])
    last = max(left, default=0)
    return last + (needed - len(left)) / max(rows, 1) * mean_tokens


def _fit(steps: Iterable[tuple[int, int, float]]) -> tuple[float, float, float]:
    """Least squares with a tiny ridge (so a window where rows never varied still solves)."""
    s = [[0.0] * 3 for _ in range(3)]
    v = [0.0] * 3
    n = 0
    for rows, new, t in steps:
        x = (1.0, float(rows), float(new))
        for i in range(3):
            v[i] += x[i] * t
            for j in range(3):
                s[i][j] += x[i] * x[j]
        n += 1
    if not n:
        return 0.0, 0.0, 0.0
    for i in range(3):
        s[i][i] += 1e-6 * (s[i][i] + 1.0)
    a, b, c = _solve(s, v)
    if b < 0 or c < 0:  # noise made a slope negative: fall back to the mean step time
        return v[0] / n, 0.0, 0.0
    return a, b, c


def _solve(m: list[list[float]], y: list[float]) -> tuple[float, float, float]:
    """Solve the 3x3 system ``m x = y`` (Gaussian elimination, partial pivoting)."""
    a = [[*row, rhs] for row, rhs in zip(m, y, strict=True)]
    for col in range(3):
        pivot = max(range(col, 3), key=lambda r: abs(a[r][col]))
        a[col], a[pivot] = a[pivot], a[col]
        for r in range(col + 1, 3):
            f = a[r][col] / a[col][col]
            for k in range(col, 4):
                a[r][k] -= f * a[col][k]
    x = [0.0] * 3
    for r in (2, 1, 0):
        x[r] = (a[r][3] - sum(a[r][k] * x[k] for k in range(r + 1, 3))) / a[r][r]
    return x[0], x[1], x[2]
