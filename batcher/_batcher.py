"""Batcher: the public facade over the engines of one model.

It picks the service from the backend's kind (generation backends: :mod:`batcher._generation`;
one-shot batch functions: :mod:`batcher._oneshot`), owns the engines' lifetime (``async with``:
start, then drain and close) and reports their statistics. The work happens in those modules.
"""

from __future__ import annotations

import asyncio
from collections.abc import Coroutine, Sequence
from types import TracebackType
from typing import Any, Unpack

from . import _metrics
from ._admission import Admission, State
from ._backend import BatchFunction, GenerationBackend, backend_kind
from ._config import BatchConfig
from ._engine import Engine
from ._errors import BatcherClosed, BatcherError, InvalidRequest
from ._generation import GenerationBatcher
from ._oneshot import OneShotBatcher
from ._stats import BatcherStats, EngineReport, merge
from ._stream import TokenStream
from ._types import Completion, GenerationOptions, Prompt

__all__ = ["Batcher"]


class Batcher:
    """Batches many concurrent requests onto one model per device.

    ``backend`` is a :class:`GenerationBackend` (for :meth:`stream`/:meth:`generate`), a list of
    them (one engine each, say one per GPU; a new request goes to the least-loaded), or a one-shot
    batch function ``list[In] -> list[Out]`` (or a list of them) for :meth:`infer`.
    Pass a ``prometheus_client.CollectorRegistry`` as ``registry`` to export metrics there.

    Use it as ``async with Batcher(...) as b:``; leaving the block drains (see :meth:`aclose`).
    """

    def __init__(
        self,
        backend: GenerationBackend
        | BatchFunction[Any, Any]
        | Sequence[GenerationBackend]
        | Sequence[BatchFunction[Any, Any]],
        config: BatchConfig | None = None,
        *,
        registry: Any = None,
        model_name: str | None = None,
    ) -> None:
        backends: list[Any] = list(backend) if isinstance(backend, Sequence) else [backend]
        kind = backend_kind(backends)
        self.config = config or BatchConfig()
        first = backends[0]
        self.model_name: str = str(
            model_name
            or getattr(first, "model_name", None)
            or getattr(first, "__name__", type(first).__name__)
        )
        self._registry = registry
        self._service: GenerationBatcher | OneShotBatcher[Any, Any] = (
            GenerationBatcher(backends, self.config)
            if kind == "generation"
            else OneShotBatcher(backends, self.config)
        )
        self._admission: Admission[Any] = self._service.admission
        self._engines: Sequence[Engine] = self._service.engines

    # -- lifecycle --------------------------------------------------------------------------
    @property
    def state(self) -> State:
        return self._admission.state

    @property
    def ready(self) -> bool:
        """True while the batcher accepts requests (started, not draining)."""
        return self._admission.state == "running"

    async def start(self) -> None:
        """Start each engine's threads, run each backend's ``start()`` on its device thread, and
        launch the engines."""
        gate = self._admission
        if gate.state != "new":
            raise BatcherClosed(f"cannot start a batcher that is {gate.state}: create a new one")
        gate.state = "starting"
        try:
            await asyncio.gather(*(e.start() for e in self._engines))
        except Exception as exc:
            await self._stop_engines()
            gate.state = "closed"
            raise BatcherError(
                f"a backend failed to start ({exc!r}): fix the model or device "
                "settings and create a new Batcher"
            ) from exc
        for e in self._engines:
            e.launch()
        if self._registry is not None:
            _metrics.attach(self._registry, self)
        gate.state = "running"

    async def __aenter__(self) -> Batcher:
        await self.start()
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.aclose()

    async def aclose(self, timeout: float | None = None) -> None:
        """Drain, then stop: refuse new requests (:class:`BatcherClosed`), let admitted ones finish
        for up to ``timeout`` seconds (default ``config.drain_timeout_s``), end the rest with
        :class:`BatcherClosed` (outcome ``shutdown``), free the backends and join every thread."""
        gate = self._admission
        if gate.state in ("closed", "draining"):
            return
        if gate.state == "new":
            gate.state = "closed"
            return
        gate.state = "draining"
        timeout = self.config.drain_timeout_s if timeout is None else timeout
        busy = [idle for idle in (e.wait_idle() for e in self._engines) if not idle.done()]
        if busy:
            await asyncio.wait(busy, timeout=timeout)
        error = BatcherClosed(
            f"the batcher shut down before this request finished (drain timeout "
            f"{timeout:g} s): retry it on another replica"
        )
        for e in self._engines:
            e.end_all("shutdown", error)
        await self._stop_engines()
        if self._registry is not None:
            _metrics.detach(self._registry, self)
        gate.state = "closed"

    async def _stop_engines(self) -> None:
        for e in self._engines:
            await e.stop()

    # -- requests ---------------------------------------------------------------------------
    def stream(self, prompt: Prompt, /, **options: Unpack[GenerationOptions]) -> TokenStream:
        """Generate for ``prompt`` (text, or chat messages), streaming :class:`Chunk` deltas.

        Options are validated now (:class:`InvalidRequest` names the bad field); admission
        (:class:`Overloaded`, :class:`BatcherClosed`, :class:`PromptTooLong`) happens on entering
        ``async with`` or at the first iteration. The last chunk carries ``finish_reason`` and
        ``usage``; iteration raises :class:`DeadlineExceeded` or :class:`RequestFailed` if the
        request ends so. Leaving the stream early cancels the request.
        """
        return self._generation().stream(prompt, dict(options))

    def generate(
        self, prompt: Prompt, /, **options: Unpack[GenerationOptions]
    ) -> Coroutine[Any, Any, Completion]:
        """Generate for ``prompt``; await the whole :class:`Completion` (what the stream would
        give, joined). Errors are those of :meth:`stream`, raised when awaited."""
        return self._generation().generate(prompt, dict(options))

    def infer(self, item: Any) -> Coroutine[Any, Any, Any]:
        """Run ``item`` through the one-shot batch function, batched with concurrent calls."""
        if not isinstance(self._service, OneShotBatcher):
            self._admission.refuse("rejected")
            raise InvalidRequest(
                "this batcher serves a generation backend: use stream() or "
                "generate(), or pass a batch function for infer()",
                field="backend",
            )
        return self._service.infer(item)

    def _generation(self) -> GenerationBatcher:
        if not isinstance(self._service, GenerationBatcher):
            self._admission.refuse("rejected")
            raise InvalidRequest(
                "this batcher serves a one-shot batch function: use infer(), or "
                "pass a GenerationBackend to stream()/generate()",
                field="backend",
            )
        return self._service

    # -- statistics -------------------------------------------------------------------------
    @property
    def queue_depth(self) -> int:
        """Requests admitted and not yet running, over all engines."""
        return self._admission.queue_depth

    def retry_after(self) -> float:
        """Seconds until the work admitted has likely drained (tokens still to generate ÷ tokens
        delivered per second), times a random factor in [0.75, 1.25] so refused clients spread out."""
        return self._admission.retry_after()

    def engine_stats(self) -> list[EngineReport]:
        """Per engine (one per device): its name, queue depth, running batch and statistics, as
        the Prometheus collector exports them."""
        return [e.report() for e in self._engines]

    def stats(self) -> BatcherStats:
        """A snapshot of queue, batch and outcome statistics summed over the engines."""
        return merge(self.engine_stats())
