"""Admission: the gate every request passes, generation or one-shot, before it reaches an engine.

A request is admitted when the batcher is running, fewer than ``max_queue`` requests wait
(summed over the engines) and, with ``tenant_max_queue``, fewer than that many of its tenant's; it
goes to the least-loaded engine. With ``ttft_slo_s``, a request whose predicted time to first
token there exceeds it is refused at once too. A refusal raises at once, with a message that says
what to do, and counts as that engine's ``shutdown``, ``overloaded`` or ``rejected`` outcome.

``retry_after`` is the time to drain the work admitted (tokens still to generate ÷ tokens
delivered per second, measured), times a random factor in [0.75, 1.25], so that clients refused
together do not all come back together.
"""

from __future__ import annotations

import asyncio
import random
from collections.abc import Sequence
from typing import Generic, Literal, Protocol, TypeVar

from ._config import BatchConfig
from ._errors import BatcherClosed, Overloaded
from ._stats import DrainRate, EngineStats
from ._types import Outcome

__all__ = ["Admission", "State"]

#: A batcher's life: it admits requests only while ``running``.
State = Literal["new", "starting", "running", "draining", "closed"]


class _Engine(Protocol):
    """What admission reads of an engine."""

    @property
    def queue_depth(self) -> int: ...
    @property
    def load(self) -> int: ...
    @property
    def stats(self) -> EngineStats: ...
    def tenant_queued(self, tenant: str) -> int: ...
    def predicted_ttft(self, tenant: str | None) -> float | None: ...
    def drain_estimate(self, now: float) -> tuple[float, float]: ...


E = TypeVar("E", bound=_Engine)


class Admission(Generic[E]):
    """The gate of one batcher's engines (see module doc). The batcher moves :attr:`state`."""

    def __init__(self, config: BatchConfig, engines: Sequence[E], drain: DrainRate) -> None:
        self.state: State = "new"
        self.config = config
        self.engines = engines
        self.drain = drain  # the engines record each request that leaves the queue
        self._jitter = random.Random()

    def admit(self, tenant: str | None = None) -> E:
        """The engine a new request (of ``tenant``, for a generation request) goes to; raises
        :class:`BatcherClosed` or :class:`Overloaded`."""
        engine = self.least_loaded()
        if self.state != "running":
            engine.stats.count("shutdown", tenant=tenant)
            raise BatcherClosed(self._closed_message())
        if self.queue_depth >= self.config.max_queue:
            raise self._overloaded(
                engine, tenant, f"queue is full (max_queue={self.config.max_queue})", "raise max_queue"
            )
        limit = self.config.tenant_max_queue
        if tenant is not None and limit is not None and self._tenant_queued(tenant) >= limit:
            why = f"tenant {tenant!r} has {limit} requests queued (tenant_max_queue={limit})"
            raise self._overloaded(engine, tenant, why, "raise tenant_max_queue")
        slo = self.config.ttft_slo_s
        if slo is not None and (ttft := engine.predicted_ttft(tenant)) is not None and ttft > slo:
            why = f"predicted time to first token {ttft:.2g} s exceeds the objective (ttft_slo_s={slo:g})"
            raise self._overloaded(engine, tenant, why, "send it to another replica")
        return engine

    def _overloaded(self, engine: E, tenant: str | None, why: str, advice: str) -> Overloaded:
        """Count an ``overloaded`` refusal and build its error, with a fresh jittered retry time."""
        engine.stats.count("overloaded", tenant=tenant)
        retry = self.retry_after()
        return Overloaded(f"{why}: retry in {retry:.2g} s, or {advice}", retry_after=retry)

    def _tenant_queued(self, tenant: str) -> int:
        return sum(e.tenant_queued(tenant) for e in self.engines)

    def refuse(self, outcome: Outcome) -> None:
        """Count a request refused before admission (say an invalid one) on the least-loaded engine."""
        self.least_loaded().stats.count(outcome)

    @property
    def queue_depth(self) -> int:
        """Requests admitted and not yet running, over all engines."""
        engines = self.engines
        return engines[0].queue_depth if len(engines) == 1 else sum(e.queue_depth for e in engines)

    def least_loaded(self) -> E:
        engines = self.engines
        return engines[0] if len(engines) == 1 else min(engines, key=lambda e: e.load)

    def retry_after(self) -> float:
        """Seconds until the work admitted has likely drained, jittered (see module doc)."""
        now = asyncio.get_running_loop().time()
        work = rate = 0.0
        for e in self.engines:
            w, r = e.drain_estimate(now)
            work, rate = work + w, rate + r
        if rate <= 0:  # no token rate (one-shot engines, or nothing served yet): requests
            work, rate = self.queue_depth, self.drain.per_second(now)
        spread = self._jitter.uniform(0.75, 1.25)  # refused clients must not retry in lockstep
        if rate <= 0:  # nothing measured yet: about a second
            return spread
        return min(max(work / rate * spread, 0.05), 300.0)

    def _closed_message(self) -> str:
        if self.state in ("new", "starting"):
            return "the batcher is not started: use `async with Batcher(...)` or await start()"
        return f"the batcher is {self.state}: send the request to another replica"
