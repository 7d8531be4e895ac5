"""Engines: one per device, each an asyncio task driving a backend on its own worker thread.

:class:`GenerationEngine` does iteration-level (continuous) batching: before every step it asks the
scheduler which waiting requests join, sends the backend the newcomers to prefill and the ids to
drop (cancelled, expired), and fans the step's tokens out to each request's mailbox. While a step
runs on the device thread the loop keeps admitting, tokenizing (on the host thread) and delivering,
so the next plan is ready when the step returns.

When steps are very short (under ``_PIPELINE_BELOW_S``: a fast backend, or a tiny model on a GPU),
the engine keeps a second step queued on the device thread: the thread starts it the moment it
posts the previous result, instead of sleeping until the loop has delivered that result and sent
the next plan (each such sleep and wake-up costs tens of microseconds on a VM, as much as a short
step). The price is one step of lag: a slot freed by a sequence finishing in step N is refilled
in step N+2, and a consumer may receive two steps' tokens in one chunk. Slow steps (any real model
on a CPU) are never pipelined, so there the next plan always sees the last step's outcome. A
pipelined step that could only carry sequences certain to have finished is not sent.

:class:`OneShotEngine` serves a batch function ``list[In] -> list[Out]``: it waits at most
``batch_window_s`` (from the oldest item's arrival) to fill ``max_batch_size`` items, then runs them.

Only the event loop thread touches engine state; the worker thread only runs backend code.
"""

from __future__ import annotations

import asyncio
import time
from collections import deque
from collections.abc import Callable, Sequence
from typing import Any

from ._backend import BatchFunction, GenerationBackend, NewSequence, StepResult
from ._config import BatchConfig
from ._errors import BatcherError, PromptTooLong, RequestFailed
from ._request import PREPARING, RUNNING, WAITING, GenRequest, release
from ._scheduler import plan
from ._stats import DrainRate, EngineStats
from ._types import Outcome
from ._worker import WorkerThread

__all__ = ["GenerationEngine", "OneShotEngine"]

#: Steps shorter than this are pipelined (see the module doc): below it the two thread wake-ups
#: of a hand-off (tens of microseconds each on a virtual machine) are a noticeable share of a step.
_PIPELINE_BELOW_S = 0.002


def _failed(message: str, cause: BaseException) -> RequestFailed:
    err = RequestFailed(f"{message}: {cause!r}")
    err.__cause__ = cause
    return err


class _EngineBase:
    """Lifecycle shared by both engines: the worker thread, the task, wake-ups, statistics."""

    def __init__(self, index: int, config: BatchConfig, drain: DrainRate, on_end: Callable[[], None]) -> None:
        self.index = index
        self.name = str(index)
        self.config = config
        self.stats = EngineStats()
        self.worker = WorkerThread(f"batcher-device-{index}")
        self._drain = drain
        self._on_end = on_end
        self._wakeup: asyncio.Future[None] | None = None
        self._stopping = False
        self._task: asyncio.Task[None] | None = None

    @property
    def load(self) -> int:
        return self.queue_depth + self.running

    @property
    def queue_depth(self) -> int:
        raise NotImplementedError

    @property
    def running(self) -> int:
        raise NotImplementedError

    def launch(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._run(), name=f"batcher-engine-{self.index}")

    async def stop(self) -> None:
        """End the loop once no work is left, free the backend on its thread, end the thread."""
        self._stopping = True
        self._wake()
        if self._task is not None:
            await self._task
        await self._close_backend()
        await self.worker.stop()

    async def _close_backend(self) -> None:
        return None

    async def _run(self) -> None:
        raise NotImplementedError

    def _wake(self) -> None:
        waiter, self._wakeup = self._wakeup, None
        release(waiter)

    async def _sleep_until_woken(self, until: float | None = None) -> None:
        loop = asyncio.get_running_loop()
        fut = self._wakeup = loop.create_future()
        timer = None if until is None else loop.call_at(until, self._wake)
        try:
            await fut
        finally:
            if timer is not None:
                timer.cancel()

    def count(self, outcome: Outcome, duration: float | None = None) -> None:
        self.stats.outcomes[outcome] += 1
        if duration is not None:
            self.stats.duration.observe(duration)


class GenerationEngine(_EngineBase):
    """Continuous batching of one :class:`GenerationBackend` (see module doc)."""

    def __init__(
        self,
        index: int,
        backend: GenerationBackend,
        config: BatchConfig,
        drain: DrainRate,
        on_end: Callable[[], None],
    ) -> None:
        super().__init__(index, config, drain, on_end)
        self.backend = backend
        limits = [x for x in (config.max_batch_tokens, getattr(backend, "max_batch_tokens", None)) if x]
        self.token_budget: int | None = min(limits) if limits else None
        self._waiting: list[GenRequest] = []
        self._n_preparing = 0
        self._n_waiting = 0
        self._running: dict[int, GenRequest] = {}
        self._reserved = 0
        self._drop: list[int] = []
        self._last_busy = 1.0

    @property
    def queue_depth(self) -> int:
        return self._n_preparing + self._n_waiting

    @property
    def running(self) -> int:
        return len(self._running)

    # -- called by the batcher and the requests (event loop) --------------------------------
    def add_preparing(self) -> None:
        self._n_preparing += 1

    def enqueue(self, req: GenRequest) -> None:
        """A tokenized request joins this engine's queue (or is refused: it can never fit)."""
        self._n_preparing -= 1
        req.state = WAITING
        self._n_waiting += 1
        if self.token_budget is not None and req.cost > self.token_budget:
            req.finish(
                "rejected",
                error=PromptTooLong(
                    f"prompt ({len(req.prompt_ids)} tokens) + max_tokens ({req.params.max_tokens}) = "
                    f"{req.cost} exceeds the batch token budget of {self.token_budget}: shorten the "
                    "prompt, lower max_tokens, or raise max_batch_tokens",
                    limit=self.token_budget,
                    requested=req.cost,
                ),
            )
            return
        self._waiting.append(req)
        # Wake an idle engine; during its batch window only a full batch ends the wait early.
        if self._n_waiting == 1 or self._n_waiting >= self.config.max_batch_size:
            self._wake()

    def on_request_end(self, req: GenRequest, was: int, duration: float) -> None:
        if was == PREPARING:
            self._n_preparing -= 1
        elif was == WAITING:
            self._n_waiting -= 1
        elif was == RUNNING and self._running.pop(req.seq_id, None) is not None:
            self._reserved -= req.cost
            self._drop.append(req.seq_id)  # the backend still holds it: free it at the next step
            self._wake()
        assert req.outcome is not None
        self.count(req.outcome, duration)
        self._on_end()

    def end_all(self, outcome: Outcome, error: BaseException) -> None:
        for req in [*self._running.values(), *self._waiting]:
            req.finish(outcome, error=error)

    # -- the loop ---------------------------------------------------------------------------
    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        window = self.config.batch_window_s
        in_flight: deque[tuple[asyncio.Future[tuple[StepResult, float]], int]] = deque()
        while True:
            if not self._running and not self._n_waiting and not self._drop:
                if in_flight:
                    await self._complete(*in_flight.popleft(), loop)
                elif self._stopping and not self._n_preparing:
                    return
                else:
                    await self._sleep_until_woken()
                continue
            if in_flight and len(in_flight) >= (2 if self._last_busy < _PIPELINE_BELOW_S else 1):
                await self._complete(*in_flight.popleft(), loop)
                continue
            if (
                not self._running
                and not in_flight
                and window > 0
                and not self._stopping
                and self._n_waiting < self.config.max_batch_size
            ):
                await self._sleep_until_woken(loop.time() + window)
            admit = self._plan(loop.time())
            if admit or self._drop or self._outlives(len(in_flight)):
                in_flight.append(self._submit(admit))
            elif in_flight:
                await self._complete(*in_flight.popleft(), loop)
            else:  # waiting requests none of which can be admitted yet: never spin
                await self._sleep_until_woken(loop.time() + window + 0.001)

    def _outlives(self, steps: int) -> bool:
        """Whether some running sequence may still need a step after the ``steps`` in flight
        (counting one token per step; a sequence that ends earlier, on EOS or a stop string,
        only makes a pipelined step carry less)."""
        return any(r.produced + steps < r.params.max_tokens for r in self._running.values())

    def _plan(self, now: float) -> list[GenRequest]:
        free_tokens = None if self.token_budget is None else self.token_budget - self._reserved
        admit, expired, rest = plan(
            [r for r in self._waiting if not r.done],
            free_slots=self.config.max_batch_size - len(self._running),
            free_tokens=free_tokens,
            now=now,
            aging_s=self.config.priority_aging_s,
        )
        self._waiting = rest
        for r in expired:
            r.expire()
        stats = self.stats
        for r in admit:
            r.state = RUNNING
            self._running[r.seq_id] = r
            self._reserved += r.cost
            stats.queue_wait.observe(now - r.arrival)
            stats.prompt_tokens += len(r.prompt_ids)
        self._n_waiting -= len(admit)
        self._drain.record(now, len(admit))
        return admit

    def _submit(self, admit: list[GenRequest]) -> tuple[asyncio.Future[tuple[StepResult, float]], int]:
        news = [NewSequence(r.seq_id, r.prompt_ids, r.params) for r in admit]
        drop, self._drop = self._drop, []
        try:
            fut = self.worker.submit(_timed_step, self.backend, news, drop)
        except BatcherError as e:  # the thread is gone: _complete fails the step's sequences
            fut = asyncio.get_running_loop().create_future()
            fut.set_exception(e)
        return fut, len(self._running)

    async def _complete(
        self, fut: asyncio.Future[tuple[StepResult, float]], batch: int, loop: asyncio.AbstractEventLoop
    ) -> None:
        try:
            result, busy = await fut
        except Exception as e:
            self._fail_running(e, batch)
            return
        self._last_busy = busy
        now = loop.time()
        stats = self.stats
        stats.steps += 1
        stats.busy_seconds += busy
        stats.step_duration.observe(busy)
        if batch:
            stats.batch_size.observe(batch)
        stats.batch_tokens.observe(result.computed_tokens or batch)
        stats.computed_tokens += result.computed_tokens
        stats.padding_tokens += result.padding_tokens
        self._deliver(result, now)

    def _deliver(self, result: StepResult, now: float) -> None:
        running = self._running
        stats = self.stats
        generated = 0
        for out in result.outputs:
            r = running.get(out.seq_id)
            if r is None:
                continue  # ended on the loop while the step ran; dropped at the next step
            n = len(out.token_ids)
            if n:
                generated += n
                if r.first_token_at is None:
                    r.first_token_at = now
                    stats.ttft.observe(now - r.arrival)
                elif n == 1:
                    stats.itl.observe(now - r.last_token_at)
                else:
                    gap = (now - r.last_token_at) / n
                    for _ in range(n):
                        stats.itl.observe(gap)
                r.last_token_at = now
            if n or out.text:
                r.push(out.token_ids, out.text)
            reason = out.finish_reason
            if reason is None and r.produced >= r.params.max_tokens:
                reason = "length"  # the backend overran max_tokens: end it here all the same
                self._drop.append(r.seq_id)
            if reason is not None:
                del running[r.seq_id]
                self._reserved -= r.cost
                r.finish("finished", reason=reason)
        stats.generated_tokens += generated
        for seq_id, err in result.failed.items():
            r = running.pop(seq_id, None)
            if r is not None:
                self._reserved -= r.cost
                r.finish("failed", error=_failed("the backend failed this sequence", err))

    def _fail_running(self, cause: BaseException, batch: int) -> None:
        """A whole step raised: fail its sequences, drop them at the next step, keep serving."""
        victims = list(self._running.values())
        self._running.clear()
        self._reserved = 0
        self._drop.extend(r.seq_id for r in victims)
        error = _failed(f"the backend failed a step of {batch} sequences; the engine goes on", cause)
        for r in victims:
            r.finish("failed", error=error)

    async def _close_backend(self) -> None:
        if self._drop:
            drop, self._drop = self._drop, []
            try:
                await self.worker.submit(self.backend.step, [], drop)
            except Exception:  # closing anyway: close() below frees everything
                pass
        await self.worker.submit(self.backend.close)


def _timed_step(
    backend: GenerationBackend, admit: Sequence[NewSequence], drop: Sequence[int]
) -> tuple[StepResult, float]:
    t0 = time.perf_counter()
    result = backend.step(admit, drop)
    return result, time.perf_counter() - t0


class _Item:
    __slots__ = ("arrival", "future", "value")

    def __init__(self, value: Any, future: asyncio.Future[Any], arrival: float) -> None:
        self.value = value
        self.future = future
        self.arrival = arrival


class OneShotEngine(_EngineBase):
    """Batches calls of a one-shot function (see module doc)."""

    def __init__(
        self, index: int, fn: BatchFunction, config: BatchConfig, drain: DrainRate, on_end: Callable[[], None]
    ) -> None:
        super().__init__(index, config, drain, on_end)
        self.fn = fn
        self._queue: deque[_Item] = deque()
        self._in_flight: list[_Item] = []

    @property
    def queue_depth(self) -> int:
        return len(self._queue)

    @property
    def running(self) -> int:
        return len(self._in_flight)

    def submit(self, value: Any, loop: asyncio.AbstractEventLoop) -> _Item:
        item = _Item(value, loop.create_future(), loop.time())
        self._queue.append(item)
        if len(self._queue) == 1 or len(self._queue) >= self.config.max_batch_size:
            self._wake()
        return item

    def end_all(self, outcome: Outcome, error: BaseException) -> None:
        for item in [*self._in_flight, *self._queue]:
            if not item.future.done():
                item.future.set_exception(error)
                self.count(outcome)
                self._on_end()
        self._queue.clear()

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
            batch = [it for it in batch if not it.future.done()]  # skip callers that left
            if batch:
                await self._run_batch(batch, loop)

    async def _run_batch(self, batch: list[_Item], loop: asyncio.AbstractEventLoop) -> None:
        now = loop.time()
        stats = self.stats
        for it in batch:
            stats.queue_wait.observe(now - it.arrival)
        self._drain.record(now, len(batch))
        self._in_flight = batch
        try:
            outputs, busy = await self.worker.submit(_timed_call, self.fn, [it.value for it in batch])
            if len(outputs) != len(batch):
                raise TypeError(
                    f"the batch function returned {len(outputs)} results for "
                    f"{len(batch)} inputs: it must return one per input, in order"
                )
        except Exception as e:
            error = _failed(f"the batch function failed a batch of {len(batch)}", e)
            outputs, busy = [error] * len(batch), 0.0
        finally:
            self._in_flight = []
        end = loop.time()
        stats.steps += 1
        stats.busy_seconds += busy
        stats.step_duration.observe(busy)
        stats.batch_size.observe(len(batch))
        for it, out in zip(batch, outputs, strict=True):
            if it.future.done():
                continue  # the caller left, or shutdown ended it
            if isinstance(out, BaseException):
                if not isinstance(out, RequestFailed):
                    out = _failed("the batch function failed this item", out)
                it.future.set_exception(out)
                self.count("failed", end - it.arrival)
            else:
                it.future.set_result(out)
                self.count("finished", end - it.arrival)
            self._on_end()


def _timed_call(fn: BatchFunction, values: list[Any]) -> tuple[Sequence[Any], float]:
    t0 = time.perf_counter()
    out = fn(values)
    return out, time.perf_counter() - t0
