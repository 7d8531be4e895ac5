"""What every engine has: a device thread, the loop task that drives it, wake-ups and statistics.

One engine per device (or per one-shot function). The two kinds, :mod:`batcher._continuous` and
:mod:`batcher._oneshot`, share this lifecycle: ``start`` (threads, and the backend's own start),
``launch`` (the loop task), ``wait_idle`` / ``end_all`` (the batcher's drain), ``stop``. Only the
event loop thread touches an engine; its threads only run backend code.
"""

from __future__ import annotations

import asyncio
from abc import ABC, abstractmethod

from ._config import BatchConfig
from ._stats import EngineReport, EngineStats, TenantTally
from ._types import Outcome
from ._wakeup import Wakeup
from ._worker import WorkerThread

__all__ = ["Engine"]


class Engine(ABC):
    """The shared machinery of an engine (see module doc)."""

    def __init__(self, index: int, config: BatchConfig) -> None:
        self.index = index
        self.name = str(index)
        self.config = config
        self.stats = EngineStats(tenants=TenantTally(config.tenant_metrics_top_k))
        self.worker = WorkerThread(f"batcher-device-{index}")
        self._wakeup = Wakeup()  # the loop task sleeps on it
        self._idle = Wakeup()  # the batcher's drain waits on it
        self._stopping = False
        self._task: asyncio.Task[None] | None = None

    @property
    @abstractmethod
    def queue_depth(self) -> int:
        """Requests admitted here and not yet running."""

    @property
    @abstractmethod
    def running(self) -> int:
        """Requests (or one-shot items) on the device now."""

    @property
    def load(self) -> int:
        return self.queue_depth + self.running

    def report(self) -> EngineReport:
        return EngineReport(self.name, self.queue_depth, self.running, self.stats, self.tenant_queues())

    def tenant_queues(self) -> dict[str, int]:
        """Requests admitted here and not yet running, by tenant (none for one-shot engines)."""
        return {}

    def tenant_queued(self, tenant: str) -> int:
        """Requests of ``tenant`` admitted here and not yet running."""
        return 0

    def predicted_ttft(self, tenant: str | None) -> float | None:
        """Seconds until a newcomer's first token here; None when it would join the next step
        (or nothing is known)."""
        return None

    def drain_estimate(self, now: float) -> tuple[float, float]:
        """``(work, rate)``: the work admitted here and the work done per second, in tokens;
        ``(0, 0)`` when unknown (one-shot engines: admission then uses the request drain rate)."""
        return 0.0, 0.0

    # -- lifecycle (the batcher calls these in this order) -----------------------------------
    async def start(self) -> None:
        """Start the threads (and, for a generation engine, the backend on its device thread)."""
        self.worker.start()

    def launch(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._run(), name=f"batcher-engine-{self.index}")

    def wait_idle(self) -> asyncio.Future[None]:
        """A future resolved once no request is left here (at once if none is)."""
        loop = asyncio.get_running_loop()
        if self.load:
            return self._idle.wait(loop)
        idle = loop.create_future()
        idle.set_result(None)
        return idle

    @abstractmethod
    def end_all(self, outcome: Outcome, error: BaseException) -> None:
        """End every request still here with ``outcome``, raising ``error`` to its caller."""

    async def stop(self) -> None:
        """End the loop once no work is left, free the backend on its thread, end the threads."""
        self._stopping = True
        self._wake()
        if self._task is not None:
            await self._task
        await self._close_backend()
        await self.worker.stop()

    # -- for the loop task --------------------------------------------------------------------
    @abstractmethod
    async def _run(self) -> None: ...

    async def _close_backend(self) -> None:
        return None

    def _wake(self) -> None:
        self._wakeup.set()

    async def _sleep_until_woken(self, until: float | None = None) -> None:
        """Sleep until :meth:`_wake`, or until ``until`` on the loop clock."""
        loop = asyncio.get_running_loop()
        woken = self._wakeup.wait(loop)
        timer = None if until is None else loop.call_at(until, self._wake)
        try:
            await woken
        finally:
            if timer is not None:
                timer.cancel()
