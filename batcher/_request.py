"""One generation request's life on the event loop: its state, its deadline, and its mailbox.

Every request ends exactly once (:meth:`GenRequest.finish` is the only way out, and it is
idempotent): finished, cancelled, deadline, failed, rejected or shutdown. The mailbox merges the
deltas a slow consumer has not taken yet into one chunk, so it never holds more than one pending
chunk's worth of objects.
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from typing import TYPE_CHECKING

from ._errors import DeadlineExceeded
from ._types import Chunk, FinishReason, Outcome, Prompt, SamplingParams, Usage

if TYPE_CHECKING:
    from ._engine import GenerationEngine

__all__ = ["GenRequest", "release"]


def release(waiter: asyncio.Future[None] | None) -> None:
    """Wake whoever awaits ``waiter``, if it is still pending: how every loop-side wait ends."""
    if waiter is not None and not waiter.done():
        waiter.set_result(None)


# Where a request is. PREPARING: admitted, being tokenized. WAITING: in an engine's queue.
PREPARING, WAITING, RUNNING, DONE = 0, 1, 2, 3


class GenRequest:
    """A generation request. Touched only on the event loop thread."""

    __slots__ = (
        "_error",
        "_finish_reason",
        "_ids",
        "_loop",
        "_on_prepared",
        "_texts",
        "_timer",
        "_waiter",
        "arrival",
        "cost",
        "deadline",
        "engine",
        "first_token_at",
        "last_token_at",
        "outcome",
        "params",
        "priority",
        "produced",
        "prompt",
        "prompt_ids",
        "seq_id",
        "state",
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
        engine: GenerationEngine,
    ) -> None:
        self._loop = loop
        self.seq_id = seq_id
        self.prompt = prompt
        self.params = params
        self.priority = priority
        self.arrival = loop.time()
        self.deadline = None if deadline_s is None else self.arrival + deadline_s
        self.engine = engine
        self.state = PREPARING
        self.prompt_ids: tuple[int, ...] = ()
        self.cost = 0
        self.produced = 0
        self.first_token_at: float | None = None
        self.last_token_at = 0.0
        self.outcome: Outcome | None = None
        self._timer = None if self.deadline is None else loop.call_at(self.deadline, self.expire)
        self._texts: list[str] = []
        self._ids: list[int] = []
        self._finish_reason: FinishReason | None = None
        self._error: BaseException | None = None
        self._waiter: asyncio.Future[None] | None = None
        self._on_prepared: asyncio.Future[None] | None = None

    @property
    def done(self) -> bool:
        return self.state == DONE

    # -- the engine's side ------------------------------------------------------------------
    def prepared(self, ids: tuple[int, ...]) -> None:
        self.prompt_ids = ids
        self.cost = len(ids) + self.params.max_tokens
        release(self._on_prepared)  # the engine's enqueue() moves it to WAITING

    def push(self, ids: Sequence[int], text: str) -> None:
        """Deliver new tokens (merged with any the consumer has not taken yet)."""
        self._ids.extend(ids)
        if text:
            self._texts.append(text)
        self.produced += len(ids)
        self._wake()

    def finish(
        self, outcome: Outcome, *, reason: FinishReason | None = None, error: BaseException | None = None
    ) -> None:
        """End the request, once; later calls do nothing."""
        if self.state == DONE:
            return
        was = self.state
        self.state = DONE
        self.outcome = outcome
        self._finish_reason = reason
        self._error = error
        if self._timer is not None:
            self._timer.cancel()
        self.engine.on_request_end(self, was, self._loop.time() - self.arrival)
        release(self._on_prepared)
        self._wake()

    def cancel(self) -> None:
        self.finish("cancelled")

    def expire(self) -> None:
        self._timer = None
        budget = (self.deadline or self.arrival) - self.arrival
        where = "in the queue" if self.state != RUNNING else f"after {self.produced} tokens"
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
        if self.state == PREPARING:
            self._on_prepared = self._loop.create_future()
            await self._on_prepared
        if self.state == DONE and self._error is not None and not self._ids:
            raise self._error

    async def next_chunk(self) -> Chunk | None:
        """The next chunk (merging everything pending), or None after the final one."""
        while (chunk := self.take_chunk()) is None and self.state != DONE:
            await self.wait_for_data()
        return chunk

    async def wait_for_data(self) -> None:
        """Wait until tokens arrive or the request ends (the stream calls this only when
        :meth:`take_chunk` found nothing, so a lagging consumer never waits)."""
        self._waiter = self._loop.create_future()
        await self._waiter

    def take_chunk(self) -> Chunk | None:
        """Everything pending, merged into one chunk (the final one carries the finish reason and
        usage); None when nothing is pending, or nothing more will come. Once a failed request's
        tokens are taken, raises its error (once)."""
        if self._ids or self._texts:
            ids, self._ids = tuple(self._ids), []
            text = "".join(self._texts)
            self._texts = []
            if self.state == DONE and self._finish_reason is not None:
                reason, self._finish_reason = self._finish_reason, None
                return Chunk(text, ids, reason, self.usage)
            return Chunk(text, ids)
        if self.state != DONE:
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
