"""How a task on the event loop waits for something another part of the loop will do: never a poll."""

from __future__ import annotations

import asyncio

__all__ = ["Wakeup", "release"]


class Wakeup:
    """One waiter at a time: :meth:`wait` hands out a future, :meth:`set` resolves it.

    A ``set`` with nobody waiting is forgotten: waiters re-check their condition before waiting.
    """

    __slots__ = ("_waiter",)

    def __init__(self) -> None:
        self._waiter: asyncio.Future[None] | None = None

    def wait(self, loop: asyncio.AbstractEventLoop) -> asyncio.Future[None]:
        """A future the next :meth:`set` resolves (it replaces any earlier waiter)."""
        waiter = self._waiter = loop.create_future()
        return waiter

    def set(self) -> None:
        waiter, self._waiter = self._waiter, None
        release(waiter)


def release(waiter: asyncio.Future[None] | None) -> None:
    """Resolve ``waiter`` if it is still pending. (Per-request waiters are bare futures, set with
    this: a :class:`Wakeup` object for each would cost an allocation on the admission path.)"""
    if waiter is not None and not waiter.done():
        waiter.set_result(None)
