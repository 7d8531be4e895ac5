"""One generation request on the event loop: its stage, its deadline and its mailbox.

A request moves PREPARING → WAITING → RUNNING → DONE. Its engine's
:class:`~batcher._pipeline.Pipeline` makes every move but the last; :meth:`GenRequest.finish` is the
only way to DONE, runs once, and calls the pipeline back once (``on_end``). The mailbox merges the
deltas a slow consumer has not taken yet into one chunk, so it never holds more than one pending
chunk's worth of objects.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Sequence
from enum import IntEnum

from ._errors import DeadlineExceeded, PromptTooLong
from ._types import Chunk, FinishReason, Logprobs, Outcome, Prompt, SamplingParams, Usage
from ._wakeup import release

__all__ = ["DONE", "PREPARING", "RUNNING", "WAITING", "GenRequest", "OnEnd", "Stage"]


class Stage(IntEnum):
    """Where a request is in its engine (see docs/architecture.md for the drawing)."""

    PREPARING = 0  # admitted; its prompt is being tokenized on the host thread
    WAITING = 1  # tokenized; in the engine's queue
    RUNNING = 2  # in the running batch: the backend holds its state
    DONE = 3  # ended, with exactly one outcome


PREPARING, WAITING, RUNNING, DONE = Stage

#: Called once when a request ends, with the stage it was in and its age: the owner's one hook.
OnEnd = Callable[["GenRequest", Stage, float], None]


class GenRequest:
    """A generation request. Touched only on the event loop thread."""

    __slots__ = (
        "_error",
        "_finish_reason",
        "_ids",
        "_logprobs",
        "_loop",
        "_on_end",
        "_prepared_waiter",
        "_texts",
        "_timer",
        "_waiter",
        "arrival",
        "cost",
        "deadline",
        "first_token_at",
        "generated",
        "last_token_at",
        "outcome",
        "params",
        "prefill",
        "priority",
        "produced",
        "prompt",
        "prompt_ids",
        "seq_id",
        "stage",
        "tenant",
    )

    def __init__(
        self,
        loop: asyncio.AbstractEventLoop,
        seq_id: int,
        prompt: Prompt,
        params: SamplingParams,
        *,
        priority: int,
        deadline_s: float | None,
        on_end: OnEnd,
        tenant: str = "default",
    ) -> None:
        self._loop = loop
        self._on_end = on_end
        self.seq_id = seq_id
        self.prompt = prompt
        self.params = params
        self.priority = priority
        self.tenant = tenant
        self.arrival = loop.time()
        self.deadline = None if deadline_s is None else self.arrival + deadline_s
        self.stage = PREPARING
        self.prompt_ids: tuple[int, ...] = ()
        self.cost = 0  # KV tokens reserved while running: prompt + max_tokens
        self.prefill = 0  # prompt tokens to compute when admitted: less the backend's cached prefix
        self.produced = 0
        self.generated: list[int] = []  # every id delivered: a resumed sequence's prompt tail
        self.first_token_at: float | None = None
        self.last_token_at = 0.0
        self.outcome: Outcome | None = None
        self._timer = None if self.deadline is None else loop.call_at(self.deadline, self.expire)
        self._texts: list[str] = []
        self._ids: list[int] = []
        self._logprobs: list[Logprobs] = []
        self._finish_reason: FinishReason | None = None
        self._error: BaseException | None = None
        self._waiter: asyncio.Future[None] | None = None  # the consumer waits for data
        self._prepared_waiter: asyncio.Future[None] | None = None  # ...or to be queued

    @property
    def done(self) -> bool:
        return self.stage == DONE

    # -- the pipeline's side ----------------------------------------------------------------
    def prepared(self, ids: tuple[int, ...], cached: int = 0) -> None:
        """The prompt is tokenized (``cached`` of its first tokens expected from the backend's
        prefix cache): set its ids, cost and prefill, and wake a consumer waiting for it."""
        self.prompt_ids = ids
        self.cost = len(ids) + self.params.max_tokens
        self.prefill = len(ids) - min(max(cached, 0), len(ids) - 1)
        release(self._prepared_waiter)

    def push(self, ids: Sequence[int], text: str, logprobs: Sequence[Logprobs] = ()) -> None:
        """Deliver new tokens (merged with any the consumer has not taken yet)."""
        self._ids.extend(ids)
        self.generated.extend(ids)
        if text:
            self._texts.append(text)
        if logprobs:
            self._logprobs.extend(logprobs)
        self.produced += len(ids)
        self._wake()

    def finish(
        self, outcome: Outcome, *, reason: FinishReason | None = None, error: BaseException | None = None
    ) -> None:
        """End the request, once; later calls do nothing."""
        was = self.stage
        if was == DONE:
            return
        self.stage = DONE
        self.outcome = outcome
        self._finish_reason = reason
        self._error = error
        if self._timer is not None:
            self._timer.cancel()
        self._on_end(self, was, self._loop.time() - self.arrival)
        release(self._prepared_waiter)
        self._wake()

    def too_long(self, budget: int) -> PromptTooLong:
        """The error of a request whose prompt + max_tokens can never fit ``budget`` KV tokens."""
        return PromptTooLong(
            f"prompt ({len(self.prompt_ids)} tokens) + max_tokens ({self.params.max_tokens}) = "
            f"{self.cost} exceeds the batch token budget of {budget}: shorten the "
            "prompt, lower max_tokens, or raise max_batch_tokens",
            limit=budget,
            requested=self.cost,
        )

    def cancel(self) -> None:
        self.finish("cancelled")

    def expire(self) -> None:
        self._timer = None
        budget = (self.deadline or self.arrival) - self.arrival
        where = "in the queue" if self.stage != RUNNING else f"after {self.produced} tokens"
        self.finish(
            "deadline",
            error=DeadlineExceeded(
                f"request passed its deadline of {budget:.3g} s {where}: "
                "raise deadline_s, lower max_tokens, or retry when the batcher is less busy"
            ),
        )

    def _wake(self) -> None:
        waiter, self._waiter = self._waiter, None
        release(waiter)

    # -- the consumer's side ----------------------------------------------------------------
    async def wait_prepared(self) -> None:
        """Return once tokenized and queued; raise the error if it was refused or ended."""
        if self.stage == PREPARING:
            self._prepared_waiter = self._loop.create_future()
            await self._prepared_waiter
        if self.stage == DONE and self._error is not None and not self._ids:
            raise self._error

    def wait(self) -> asyncio.Future[None]:
        """A future resolved when tokens arrive or the request ends (the stream awaits it only
        when :meth:`take_chunk` found nothing, so a lagging consumer never waits)."""
        waiter = self._waiter = self._loop.create_future()
        return waiter

    def take_chunk(self) -> Chunk | None:
        """Everything pending, merged into one chunk (the final one carries the finish reason and
        usage); None when nothing is pending, or nothing more will come. Once a failed request's
        tokens are taken, raises its error (once)."""
        if self._ids or self._texts:
            ids, self._ids = tuple(self._ids), []
            text = "".join(self._texts)
            self._texts = []
            logprobs: tuple[Logprobs, ...] = ()
            if self._logprobs:
                logprobs, self._logprobs = tuple(self._logprobs), []
            if self.stage == DONE and self._finish_reason is not None:
                reason, self._finish_reason = self._finish_reason, None
                return Chunk(text, ids, reason, self.usage, logprobs)
            return Chunk(text, ids, None, None, logprobs)
        if self.stage != DONE:
            return None
        if self._error is not None:
            error, self._error = self._error, None
            raise error
        if self._finish_reason is not None:
            reason, self._finish_reason = self._finish_reason, None
            return Chunk("", (), reason, self.usage)
        return None

    @property
    def usage(self) -> Usage:
        return Usage(len(self.prompt_ids), self.produced)
