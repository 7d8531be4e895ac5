"""The requests of one generation engine, by stage: the one owner of a request's life.

    admit ─► PREPARING ─► WAITING ─► RUNNING ─► DONE      (any stage ─► DONE: cancel, deadline,
            (host thread)  (queue)   (device)              failure, shutdown)

Every move happens here, and the counts (queue depth, running batch, idle) are read off the
stages, never kept by hand. A request's end comes back through one callback, :meth:`_ended`,
whoever ended it. No tasks and no threads: :class:`~batcher._continuous.GenerationEngine` drives it.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Collection

from ._backend import NewSequence, PreparedPrompt, StepResult
from ._config import BatchConfig
from ._errors import InvalidRequest, failed
from ._faults import Isolation, MemoryLimits, blamed, out_of_memory, resume
from ._request import RUNNING, WAITING, GenRequest, Stage
from ._scheduler import FairShare, plan
from ._stats import DrainRate, EngineStats
from ._types import Outcome, Prompt, SamplingParams

__all__ = ["Pipeline"]


class Pipeline:
    """One engine's requests (see module doc). Touched only on the event loop thread."""

    def __init__(
        self,
        config: BatchConfig,
        token_budget: int | None,
        stats: EngineStats,
        drain: DrainRate,
        *,
        wake: Callable[[], None],
        idle: Callable[[], None],
        new_id: Callable[[], int],
    ) -> None:
        """``wake`` tells the engine a step has work; ``idle`` that no request is left; ``new_id``
        gives a fresh sequence id (unique per batcher) to a request resumed after a fault."""
        self.config = config
        self.limits = MemoryLimits(config.max_batch_size, token_budget)  # out of memory shrinks them
        self.stats = stats
        self._drain = drain
        self._wake_engine = wake
        self._idle = idle
        # Insertion-ordered by seq_id, one dict per live stage: a request is in exactly one.
        # _running holds the sequences the backend holds: one it finished leaves before it ends.
        self._at: tuple[dict[int, GenRequest], ...] = ({}, {}, {})
        self._preparing, self._waiting, self._running = self._at
        self._reserved = 0  # KV tokens the running sequences reserved
        self._drop: list[int] = []  # ended on the loop; the backend frees them at the next step
        self._new_id = new_id
        self._isolation = Isolation()
        self.shares = FairShare(config.tenant_weights)
        #: Requests PREPARING or WAITING, by tenant (tenants with none are absent).
        self.tenant_queues: dict[str, int] = {}

    # -- derived counts -----------------------------------------------------------------------
    @property
    def batch_cap(self) -> int:
        return self.limits.batch_cap

    @property
    def token_budget(self) -> int | None:
        return self.limits.token_budget

    @property
    def preparing(self) -> int:
        return len(self._preparing)

    @property
    def waiting(self) -> int:
        return len(self._waiting)

    @property
    def running(self) -> int:
        return len(self._running)

    @property
    def queue_depth(self) -> int:
        return len(self._preparing) + len(self._waiting)

    @property
    def live(self) -> int:
        return len(self._preparing) + len(self._waiting) + len(self._running)

    def at(self, stage: Stage) -> Collection[GenRequest]:
        """The requests in ``stage`` (PREPARING, WAITING or RUNNING), oldest first: read only."""
        return self._at[stage].values()

    @property
    def has_drops(self) -> bool:
        return bool(self._drop)

    @property
    def isolating(self) -> bool:
        """Whether a failed step's suspects are being probed (one step at a time, then)."""
        return self._isolation.active

    @property
    def has_step_work(self) -> bool:
        """Whether a step could do something: sequences to run, to admit or to free."""
        return bool(self._running or self._waiting or self._drop)

    # -- admit → PREPARING → WAITING ----------------------------------------------------------
    def admit(
        self,
        seq_id: int,
        prompt: Prompt,
        params: SamplingParams,
        priority: int,
        deadline_s: float | None,
        tenant: str = "default",
    ) -> GenRequest:
        loop = asyncio.get_running_loop()
        req = GenRequest(
            loop,
            seq_id,
            prompt,
            params,
            priority=priority,
            deadline_s=deadline_s,
            on_end=self._ended,
            tenant=tenant,
        )
        self._preparing[seq_id] = req
        self._queued(tenant, 1)
        return req

    def queue(self, req: GenRequest, prepared: PreparedPrompt | BaseException) -> None:
        """``backend.prepare``'s answer for a PREPARING request: queue it (WAITING), or refuse it
        (its prompt is invalid, or it can never fit the token budget)."""
        if req.done:
            return
        if isinstance(prepared, BaseException):
            req.finish("rejected" if isinstance(prepared, InvalidRequest) else "failed", error=prepared)
            return
        if not prepared.token_ids:
            error = InvalidRequest("the prompt tokenized to no tokens: send some text", field="prompt")
            req.finish("rejected", error=error)
            return
        req.prepared(tuple(prepared.token_ids), prepared.cached_tokens)
        self._move(req, WAITING)
        if self.token_budget is not None and req.cost > self.token_budget:
            req.finish("rejected", error=req.too_long(self.token_budget))
            return
        # Wake an idle engine; during its batch window only a full batch ends the wait early.
        waiting = len(self._waiting)
        if waiting == 1 or waiting >= self.config.max_batch_size:
            self._wake_engine()

    # -- WAITING → RUNNING --------------------------------------------------------------------
    def plan(self, now: float) -> list[NewSequence]:
        """Ask the scheduler which waiting requests join the next step; expire the late ones."""
        free_tokens = None if self.token_budget is None else self.token_budget - self._reserved
        isolating = self._isolation.active
        admit, expired, _ = plan(
            self._isolation.next_group() if isolating else list(self._waiting.values()),
            free_slots=self.batch_cap - len(self._running),
            free_tokens=free_tokens,
            now=now,
            aging_s=self.config.priority_aging_s,
            shares=self.shares,
            prefill_tokens=None if isolating else self.config.max_prefill_tokens,  # probe whole groups
        )
        for r in expired:
            r.expire()
        stats = self.stats
        for r in admit:
            self._move(r, RUNNING)
            self._reserved += r.cost
            stats.queue_wait.observe(now - r.arrival)
            stats.prompt_tokens += len(r.prompt_ids)
        self._drain.record(now, len(admit))
        if isolating:
            self._isolation.probing(admit)
        return [resume(r) for r in admit]

    def take_drops(self) -> list[int]:
        drop, self._drop = self._drop, []
        return drop

    def outlives(self, steps: int) -> bool:
        """Whether some running sequence may still need a step after the ``steps`` in flight
        (counting one token per step; a sequence that ends earlier, on EOS or a stop string,
        only makes a pipelined step carry less)."""
        return any(r.produced + steps < r.params.max_tokens for r in self._running.values())

    # -- RUNNING → DONE -----------------------------------------------------------------------
    def deliver(self, result: StepResult, now: float) -> int:
        """Fan a step's tokens out to the mailboxes; end the sequences the backend ended. Returns
        the tokens delivered."""
        running = self._running
        stats = self.stats
        generated = 0
        self._isolation.passed()
        self.limits.passed()
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
                else:  # several tokens in one chunk (pipelined steps): spread the gap
                    stats.itl.observe_many((now - r.last_token_at) / n, n)
                r.last_token_at = now
            if n or out.text:
                r.push(out.token_ids, out.text, out.logprobs)
            reason = out.finish_reason
            if reason is None and r.produced >= r.params.max_tokens:
                reason = "length"  # the backend overran max_tokens: end it here all the same
                self._drop.append(r.seq_id)
            if reason is not None:
                self._release(r)
                r.finish("finished", reason=reason)
        stats.generated_tokens += generated
        if result.failed:
            self._fail_blamed(result.failed)
        return generated

    def _fail_blamed(self, blamed: dict[int, BaseException]) -> None:
        """The backend blamed these sequences for an error (and freed them): each fails alone."""
        for seq_id, err in blamed.items():
            r = self._running.get(seq_id)
            if r is not None:
                self._release(r)
                r.finish("failed", error=failed("the backend failed this sequence", err))

    def fail_step(self, cause: BaseException) -> None:
        """A whole step raised: every running sequence goes back to the queue to resume, but the
        one to blame, if found, which fails alone (see :mod:`batcher._faults`)."""
        lost = list(self._running.values())
        if not lost:
            return
        if len(lost) == 1:
            culprit: GenRequest | None = lost[0]
        elif out_of_memory(cause):
            culprit = None
            self.limits.shrink(len(lost), self._reserved, max(r.cost for r in lost))
            self._isolation.forget_probe()
        else:
            culprit = self._isolation.blame(lost)
        if culprit is None:
            self.stats.step_splits += 1
        waiting = dict(self._waiting)  # the resumed go first: they are the oldest
        self._waiting.clear()
        for r in lost:
            self._release(r)
            self._drop.append(r.seq_id)  # whatever the backend still holds of it
            if r is culprit:
                r.finish("failed", error=blamed(cause, oom=out_of_memory(cause)))
            else:
                r.seq_id, r.stage = self._new_id(), WAITING
                self._waiting[r.seq_id] = r
                self._queued(r.tenant, 1)
        self._waiting.update(waiting)
        self._wake_engine()

    def end_all(self, outcome: Outcome, error: BaseException) -> None:
        for r in [*self._preparing.values(), *self._waiting.values(), *self._running.values()]:
            r.finish(outcome, error=error)

    # -- moves ----------------------------------------------------------------------------------
    def _move(self, req: GenRequest, to: Stage) -> None:
        del self._at[req.stage][req.seq_id]
        req.stage = to
        self._at[to][req.seq_id] = req
        if to == RUNNING:
            self._queued(req.tenant, -1)

    def _queued(self, tenant: str, n: int) -> None:
        queues = self.tenant_queues
        left = queues.get(tenant, 0) + n
        if left:
            queues[tenant] = left
        else:
            del queues[tenant]

    def _release(self, req: GenRequest) -> None:
        """The backend freed this sequence (it finished or failed it): give back its tokens."""
        del self._running[req.seq_id]
        self._reserved -= req.cost

    def _ended(self, req: GenRequest, was: Stage, duration: float) -> None:
        """Every request's end, whoever ended it (:data:`~batcher._request.OnEnd`)."""
        if self._at[was].pop(req.seq_id, None) is not None:
            if was == RUNNING:
                self._reserved -= req.cost
                self._drop.append(req.seq_id)  # the backend still holds it: free it at the next step
                self._wake_engine()
            else:
                self._queued(req.tenant, -1)
        assert req.outcome is not None
        self.stats.count(req.outcome, duration, req.tenant, req.produced)
        if not (self._preparing or self._waiting or self._running):
            self._idle()
