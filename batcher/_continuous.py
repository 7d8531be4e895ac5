"""GenerationEngine: continuous batching of one :class:`GenerationBackend` on one device.

Two tasks drive the engine's :class:`~batcher._pipeline.Pipeline`. The prepare task hands the
newly admitted prompts, as one batch, to ``backend.prepare`` on the engine's host thread. The step
loop plans a step, runs it on the device thread and delivers its tokens; while a step runs, the
loop keeps admitting, tokenizing and delivering, so the next plan is ready when the step returns.
When steps are very short, a second step waits queued on the device thread (docs/architecture.md,
"Pipelined steps"). A newcomer that arrives while a step that admits nothing runs asks the
backend to stop that step early, if it can (``interrupt``): it then joins the next step at once
instead of waiting for the running one to end (docs/architecture.md, "Interrupted steps").
"""

from __future__ import annotations

import asyncio
import math
import time
from collections import deque
from collections.abc import Callable, Iterable, Sequence

from ._backend import GenerationBackend, NewSequence, PrepareRequest, StepResult
from ._config import BatchConfig
from ._cost import StepCost, steps_until_slot
from ._engine import Engine
from ._errors import BatcherError, failed
from ._options import DEFAULT_TENANT
from ._pipeline import Pipeline
from ._request import PREPARING, RUNNING, WAITING, GenRequest
from ._scheduler import ahead_of
from ._stats import DrainRate
from ._types import Outcome, Prompt, SamplingParams
from ._wakeup import Wakeup
from ._worker import WorkerThread

__all__ = ["GenerationEngine"]

#: Steps shorter than this are pipelined: below it the two thread wake-ups of a hand-off (tens of
#: microseconds each on a virtual machine) are a noticeable share of a step.
_PIPELINE_BELOW_S = 0.002

#: Only steps at least this long (the last one measured) may be interrupted for a newcomer: it
#: waits half a step on average, and below this that is less than a stop and a redo are worth.
_INTERRUPT_ABOVE_S = 0.01

#: A step sent to the device thread: its result to come, how many sequences it runs, and how many
#: prompt tokens it prefills.
_Step = tuple["asyncio.Future[tuple[StepResult, float]]", int, int]


class GenerationEngine(Engine):
    """Continuous batching on one device (see module doc)."""

    def __init__(
        self,
        index: int,
        backend: GenerationBackend,
        config: BatchConfig,
        drain: DrainRate,
        new_id: Callable[[], int],
    ) -> None:
        super().__init__(index, config)
        self.backend = backend
        self.host = WorkerThread(f"batcher-host-{index}")
        limits = [x for x in (config.max_batch_tokens, getattr(backend, "max_batch_tokens", None)) if x]
        self.pipeline = Pipeline(
            config,
            min(limits) if limits else None,
            self.stats,
            drain,
            wake=self._wake,
            idle=self._idle.set,
            new_id=new_id,
        )
        self._to_prepare: list[GenRequest] = []
        self._prepare_wakeup = Wakeup()
        self._prepare_task: asyncio.Task[None] | None = None
        self._last_busy = 1.0  # the last step's device time: decides pipelining
        self.cost = StepCost()  # learned from every step: predicts TTFT, drain, the batch window
        self._token_rate = DrainRate()  # tokens delivered per second, measured
        self._arrivals = DrainRate(window_s=2.0)  # requests admitted per second, measured
        interrupt = getattr(backend, "interrupt", None)
        self._interrupt: Callable[[], None] | None = interrupt if callable(interrupt) else None
        self._interruptible = False  # the one step in flight admits nothing: a newcomer may stop it

    @property
    def queue_depth(self) -> int:
        return self.pipeline.queue_depth

    @property
    def running(self) -> int:
        return self.pipeline.running

    def tenant_queues(self) -> dict[str, int]:
        return dict(self.pipeline.tenant_queues)

    def tenant_queued(self, tenant: str) -> int:
        return self.pipeline.tenant_queues.get(tenant, 0)

    def admit(
        self,
        seq_id: int,
        prompt: Prompt,
        params: SamplingParams,
        priority: int,
        deadline_s: float | None,
        tenant: str,
    ) -> GenRequest:
        """A new request, PREPARING: its prompt goes to the host thread with the next batch."""
        req = self.pipeline.admit(seq_id, prompt, params, priority, deadline_s, tenant)
        self._arrivals.record(req.arrival, 1)
        self._to_prepare.append(req)
        if len(self._to_prepare) == 1:
            self._prepare_wakeup.set()
        return req

    # -- lifecycle ------------------------------------------------------------------------------
    async def start(self) -> None:
        await super().start()
        self.host.start()
        await self.worker.submit(self.backend.start)
        self.stats.prefix_cache.read(self.backend)

    def launch(self) -> None:
        super().launch()
        loop = asyncio.get_running_loop()
        self._prepare_task = loop.create_task(self._prepare_loop(), name=f"batcher-prepare-{self.index}")

    def end_all(self, outcome: Outcome, error: BaseException) -> None:
        self.pipeline.end_all(outcome, error)

    async def stop(self) -> None:
        self._stopping = True
        self._prepare_wakeup.set()
        if self._prepare_task is not None:
            await self._prepare_task
        await super().stop()
        await self.host.stop()

    async def _close_backend(self) -> None:
        drop = self.pipeline.take_drops()
        if drop:
            try:
                await self.worker.submit(self.backend.step, [], drop)
            except Exception:  # closing anyway: close() below frees everything
                pass
        await self.worker.submit(self.backend.close)

    # -- the prepare task (host thread) ----------------------------------------------------------
    async def _prepare_loop(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            if not self._to_prepare:
                if self._stopping:
                    return
                await self._prepare_wakeup.wait(loop)
                continue
            batch, self._to_prepare = self._to_prepare, []
            batch = [r for r in batch if not r.done]
            if batch:
                await self._prepare(batch)

    async def _prepare(self, batch: list[GenRequest]) -> None:
        try:
            results = await self.host.submit(
                self.backend.prepare, [PrepareRequest(r.prompt, r.params) for r in batch]
            )
            if len(results) != len(batch):
                raise TypeError(f"prepare() returned {len(results)} results for {len(batch)} requests")
        except Exception as e:
            error = failed("the backend failed to prepare this request", e)
            for r in batch:
                r.finish("failed", error=error)
            return
        for r, result in zip(batch, results, strict=True):
            self.pipeline.queue(r, result)
        pipeline = self.pipeline
        if self._interruptible and pipeline.waiting and pipeline.running < pipeline.batch_cap:
            self._interruptible = False  # once per step
            assert self._interrupt is not None
            self._interrupt()

    # -- the step loop (device thread) -----------------------------------------------------------
    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        pipeline = self.pipeline
        in_flight: deque[_Step] = deque()
        while True:
            if not pipeline.has_step_work:
                if in_flight:
                    await self._complete(in_flight.popleft())
                elif self._stopping and not pipeline.preparing:
                    return
                else:
                    await self._sleep_until_woken()
            elif len(in_flight) >= self._max_in_flight():
                await self._complete(in_flight.popleft())
            elif (step := await self._next_step(len(in_flight))) is not None:
                in_flight.append(step)
            elif in_flight:
                await self._complete(in_flight.popleft())
            else:  # requests wait, none of which fits yet: sleep, never spin
                await self._sleep_until_woken(loop.time() + self.config.batch_window_s + 0.001)

    def _max_in_flight(self) -> int:
        """Two steps on the device thread at once when steps are very short, else one (and one
        while a failed step's suspects are probed: each probe must see the last one's outcome)."""
        return 2 if self._last_busy < _PIPELINE_BELOW_S and not self.pipeline.isolating else 1

    async def _next_step(self, in_flight: int) -> _Step | None:
        """Plan the next step and send it to the device thread; None if it would do nothing."""
        loop = asyncio.get_running_loop()
        if not in_flight and self._waits_for_a_first_batch():
            await self._sleep_until_woken(loop.time() + self.config.batch_window_s)
        pipeline = self.pipeline
        admit = pipeline.plan(loop.time())
        if admit or pipeline.has_drops or pipeline.outlives(in_flight):
            self._interruptible = (
                self._interrupt is not None
                and not admit
                and not in_flight
                and not pipeline.isolating
                and self._last_busy >= _INTERRUPT_ABOVE_S
            )
            return self._submit(admit)
        return None

    def _waits_for_a_first_batch(self) -> bool:
        """An idle engine waits up to ``batch_window_s`` for a first batch to fill; never while
        sequences run, when a full batch waits already, or when stopping; and, once the cost
        model has learned, only when it says waiting serves more per second (see
        :meth:`StepCost.worth_waiting`) and stays within the TTFT objective."""
        config, pipeline = self.config, self.pipeline
        if not (config.batch_window_s > 0 and not pipeline.running and not self._stopping):
            return False
        if pipeline.waiting >= pipeline.batch_cap or not self.cost.ready:
            return pipeline.waiting < pipeline.batch_cap
        window = config.batch_window_s
        if (
            config.ttft_slo_s is not None
            and window + self.cost.predict(pipeline.batch_cap, 0) > config.ttft_slo_s
        ):
            return False
        rate = self._arrivals.per_second(asyncio.get_running_loop().time())
        return self.cost.worth_waiting(pipeline.waiting, rate, window)

    # -- predictions for admission ---------------------------------------------------------------
    def predicted_ttft(self, tenant: str | None) -> float | None:
        pipeline, cost = self.pipeline, self.cost
        if not cost.ready:
            return None
        queued = pipeline.tenant_queues
        ahead = ahead_of(tenant or DEFAULT_TENANT, queued, self.config.tenant_weights)
        free = pipeline.batch_cap - pipeline.running
        budget = self.config.max_prefill_tokens
        # Steps filled by the uncached prompt tokens queued ahead (cached prefixes cost nothing).
        full = sum(r.prefill for r in pipeline.at(WAITING)) // budget if budget else 0
        if ahead < free and not full:
            return None  # it joins the next step: refusing it gains nothing
        running = pipeline.at(RUNNING)
        rows = min(pipeline.batch_cap, pipeline.running + pipeline.queue_depth + 1)
        mean_tokens = _mean(r.params.max_tokens for r in (*running, *pipeline.at(WAITING)))
        steps = steps_until_slot(
            math.ceil(ahead) + 1 - free,
            (r.params.max_tokens - r.produced for r in running),
            rows,
            mean_tokens,
        )
        step = cost.predict(
            rows, cost.mean_new_tokens if budget is None else min(cost.mean_new_tokens, budget)
        )
        prefill = full * cost.predict(rows, budget) if budget and full else 0.0
        return max(steps * step, prefill) + step

    def drain_estimate(self, now: float) -> tuple[float, float]:
        pipeline = self.pipeline
        work = sum(r.params.max_tokens - r.produced for r in pipeline.at(RUNNING))
        work += sum(r.params.max_tokens for stage in (PREPARING, WAITING) for r in pipeline.at(stage))
        rate = self._token_rate.per_second(now)
        if not rate and self.cost.ready:  # nothing measured lately: the model's full-batch rate
            rows = pipeline.batch_cap
            rate = rows / max(self.cost.predict(rows, self.cost.mean_new_tokens), 1e-9)
        return float(work), rate

    def _submit(self, admit: list[NewSequence]) -> _Step:
        drop = self.pipeline.take_drops()
        try:
            result = self.worker.submit(_timed_step, self.backend, admit, drop)
        except BatcherError as e:  # the thread is gone: _complete fails the step's sequences
            result = asyncio.get_running_loop().create_future()
            result.set_exception(e)
        return result, self.pipeline.running, sum(len(n.prompt_ids) for n in admit)

    async def _complete(self, step: _Step) -> None:
        """Wait for a step's result; record it and deliver its tokens (or fail its sequences)."""
        result_future, batch, new_tokens = step
        try:
            result, busy = await result_future
        except Exception as e:
            self._interruptible = False
            self.pipeline.fail_step(e)
            return
        self._interruptible = False
        stats = self.stats
        now = asyncio.get_running_loop().time()
        if result.interrupted:  # no tokens; its time is spent, but it is no step to learn from
            stats.interrupted_steps += 1
            stats.busy_seconds += busy
            self.pipeline.deliver(result, now)
            return
        self._last_busy = busy
        stats.observe_step(busy, batch, result.computed_tokens, result.padding_tokens)
        stats.cached_tokens += result.cached_tokens
        stats.prefix_cache.read(self.backend)
        # The model learns from the prompt tokens computed: a cached prefix costs no prefill.
        self.cost.observe(batch, max(new_tokens - result.cached_tokens, 0), busy)
        self._token_rate.record(now, self.pipeline.deliver(result, now))


def _mean(values: Iterable[int]) -> float:
    total = n = 0
    for v in values:
        total, n = total + v, n + 1
    return total / n if n else 0.0


def _timed_step(
    backend: GenerationBackend, admit: Sequence[NewSequence], drop: Sequence[int]
) -> tuple[StepResult, float]:
    t0 = time.perf_counter()
    result = backend.step(admit, drop)
    return result, time.perf_counter() - t0
