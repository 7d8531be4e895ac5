"""One-shot batching: concurrent calls of a batch function ``list[In] -> list[Out]`` run together.

:class:`OneShotBatcher` admits each ``infer`` call through the same
:class:`~batcher._admission.Admission` as generation and hands it to the least-loaded
:class:`OneShotEngine`. The engine waits at most ``batch_window_s`` (from the oldest item's
arrival) to fill ``max_batch_size`` items, then runs them on its device thread. An output that is
an ``Exception`` fails only its item; a batch function that raises fails its whole batch.
"""

from __future__ import annotations

import asyncio
import time
from collections import deque
from collections.abc import Sequence
from typing import Generic, TypeVar

from ._admission import Admission
from ._backend import BatchFunction
from ._config import BatchConfig
from ._engine import Engine
from ._errors import RequestFailed, failed
from ._stats import DrainRate
from ._types import Outcome

__all__ = ["OneShotBatcher", "OneShotEngine"]

In = TypeVar("In")
Out = TypeVar("Out")


class OneShotBatcher(Generic[In, Out]):
    """``infer`` over one :class:`OneShotEngine` per batch function (say one per device)."""

    def __init__(self, fns: Sequence[BatchFunction[In, Out]], config: BatchConfig) -> None:
        drain = DrainRate()
        self.engines = [OneShotEngine(i, fn, config, drain) for i, fn in enumerate(fns)]
        self.admission = Admission(config, self.engines, drain)

    async def infer(self, item: In) -> Out:
        """Run ``item`` through the batch function, batched with concurrent calls."""
        engine = self.admission.admit()
        queued = engine.submit(item)
        try:
            return await queued.future
        except asyncio.CancelledError:
            if queued.future.cancelled():  # the caller left: forget the item (a running one's
                engine.forget(queued)  # output is discarded)
            raise


class _Item(Generic[In, Out]):
    __slots__ = ("arrival", "future", "value")

    def __init__(self, value: In, future: asyncio.Future[Out], arrival: float) -> None:
        self.value = value
        self.future = future
        self.arrival = arrival


class OneShotEngine(Engine, Generic[In, Out]):
    """Batches the calls of one batch function on one device thread (see module doc)."""

    def __init__(self, index: int, fn: BatchFunction[In, Out], config: BatchConfig, drain: DrainRate) -> None:
        super().__init__(index, config)
        self.fn = fn
        self._drain = drain
        self._queue: deque[_Item[In, Out]] = deque()
        self._in_flight: list[_Item[In, Out]] = []

    @property
    def queue_depth(self) -> int:
        return len(self._queue)

    @property
    def running(self) -> int:
        return len(self._in_flight)

    def submit(self, value: In) -> _Item[In, Out]:
        """Queue ``value`` for the next batch: its output comes in the item's future."""
        loop = asyncio.get_running_loop()
        item: _Item[In, Out] = _Item(value, loop.create_future(), loop.time())
        queue = self._queue
        queue.append(item)
        if len(queue) == 1 or len(queue) >= self.config.max_batch_size:
            self._wake()
        return item

    def forget(self, item: _Item[In, Out]) -> None:
        """The caller left: drop its item if still queued, and count it cancelled."""
        try:
            self._queue.remove(item)  # O(queue), on cancellation only; the queue is bounded
        except ValueError:
            pass  # already taken into a batch
        self.stats.count("cancelled", asyncio.get_running_loop().time() - item.arrival)
        self._check_idle()

    def end_all(self, outcome: Outcome, error: BaseException) -> None:
        for item in [*self._in_flight, *self._queue]:
            if not item.future.done():
                item.future.set_exception(error)
                self.stats.count(outcome)
        self._queue.clear()
        self._check_idle()

    # -- the loop ---------------------------------------------------------------------------------
    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        size, window = self.config.max_batch_size, self.config.batch_window_s
        queue = self._queue
        while True:
            if not queue:
                if self._stopping:
                    return
                await self._sleep_until_woken()
                continue
            if len(queue) < size and window > 0 and not self._stopping:
                until = queue[0].arrival + window
                if until > loop.time():
                    await self._sleep_until_woken(until)
                    continue
            batch = [queue.popleft() for _ in range(min(size, len(queue)))]
            batch = [it for it in batch if not it.future.done()]  # a caller cancelled just now
            if batch:
                await self._run_batch(batch, loop)

    async def _run_batch(self, batch: list[_Item[In, Out]], loop: asyncio.AbstractEventLoop) -> None:
        now = loop.time()
        for it in batch:
            self.stats.queue_wait.observe(now - it.arrival)
        self._drain.record(now, len(batch))
        self._in_flight = batch
        outputs: Sequence[Out | BaseException]
        try:
            outputs, busy = await self.worker.submit(_timed_call, self.fn, [it.value for it in batch])
            if len(outputs) != len(batch):
                raise TypeError(
                    f"the batch function returned {len(outputs)} results for "
                    f"{len(batch)} inputs: it must return one per input, in order"
                )
        except Exception as e:
            error = failed(f"the batch function failed a batch of {len(batch)}", e)
            outputs, busy = [error] * len(batch), 0.0
        finally:
            self._in_flight = []
        self.stats.observe_step(busy, len(batch))
        end = loop.time()
        for it, out in zip(batch, outputs, strict=True):
            self._settle(it, out, end - it.arrival)
        self._check_idle()

    def _settle(self, item: _Item[In, Out], out: Out | BaseException, duration: float) -> None:
        """Hand ``item`` its output or error, unless its caller left or shutdown ended it."""
        if item.future.done():
            return
        if isinstance(out, BaseException):
            if not isinstance(out, RequestFailed):
                out = failed("the batch function failed this item", out)
            item.future.set_exception(out)
            self.stats.count("failed", duration)
        else:
            item.future.set_result(out)
            self.stats.count("finished", duration)

    def _check_idle(self) -> None:
        if not self.load:
            self._idle.set()


def _timed_call(fn: BatchFunction[In, Out], values: list[In]) -> tuple[Sequence[Out], float]:
    t0 = time.perf_counter()
    out = fn(values)
    return out, time.perf_counter() - t0
