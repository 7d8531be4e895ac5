"""A dedicated worker thread that runs blocking calls for the event loop.

Why not ``asyncio.to_thread`` or a ``ThreadPoolExecutor``: the former uses the loop's shared default
pool (the model would compete with every other blocking call in the process, and a device wants one
thread that keeps its thread-local state: CUDA context, torch thread settings), and the latter adds
a lock and a future hand-off per call and cannot tell the loop when its thread has really exited.
This is the shape of anyio's ``WorkerThread``: one thread, one queue in, results posted back with
``call_soon_threadsafe``. The thread never touches asyncio objects other than through that call.
"""

from __future__ import annotations

import asyncio
import contextvars
import threading
from collections.abc import Callable
from queue import SimpleQueue
from typing import Any, TypeVar

from ._errors import BatcherClosed

__all__ = ["WorkerThread"]

T = TypeVar("T")
_Job = tuple[Callable[..., Any], tuple[Any, ...], "asyncio.Future[Any]", contextvars.Context]


def _resolve(fut: asyncio.Future[Any], result: Any, exc: BaseException | None) -> None:
    if fut.cancelled():
        return
    if exc is None:
        fut.set_result(result)
    else:
        fut.set_exception(exc)


class WorkerThread:
    """One daemon thread running submitted callables in order. Start, submit, then ``await stop()``."""

    def __init__(self, name: str) -> None:
        self.name = name
        self._queue: SimpleQueue[_Job | None] = SimpleQueue()
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        self._loop: asyncio.AbstractEventLoop | None = None
        self._exited: asyncio.Future[None] | None = None
        self._stopping = False

    @property
    def ident(self) -> int | None:
        return self._thread.ident

    def start(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._exited = self._loop.create_future()
        self._thread.start()

    def submit(self, fn: Callable[..., T], *args: Any) -> asyncio.Future[T]:
        """Run ``fn(*args)`` on the thread (in a copy of the caller's context); await the result."""
        if self._loop is None or self._stopping:
            raise BatcherClosed(f"worker thread {self.name} is not running: start the batcher first")
        fut: asyncio.Future[T] = self._loop.create_future()
        self._queue.put((fn, args, fut, contextvars.copy_context()))
        return fut

    async def stop(self) -> None:
        """Let queued calls finish, end the thread, and wait until it has exited."""
        if self._loop is None or self._exited is None:
            return
        if not self._stopping:
            self._stopping = True
            self._queue.put(None)
        await asyncio.shield(self._exited)
        # The thread's last act was to post _exited: it ends within microseconds. Python has no
        # awaitable join, and join() would block the loop for that moment, so look without
        # blocking (is_alive never waits) and yield to the loop until it has gone.
        while self._thread.is_alive():
            await asyncio.sleep(0.0005)

    def _run(self) -> None:
        loop = self._loop
        assert loop is not None and self._exited is not None
        while (job := self._queue.get()) is not None:
            fn, args, fut, ctx = job
            try:
                result, exc = ctx.run(fn, *args), None
            except BaseException as e:  # handed to the awaiting task, never lost
                result, exc = None, e
            self._post(loop, _resolve, fut, result, exc)
        self._post(loop, _resolve, self._exited, None, None)

    @staticmethod
    def _post(loop: asyncio.AbstractEventLoop, *call: Any) -> None:
        try:
            loop.call_soon_threadsafe(*call)
        except RuntimeError:  # the loop is closed: nobody is waiting any more
            pass
