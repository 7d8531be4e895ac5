"""The public facade: :class:`Batcher` owns the engines, the host thread, admission and shutdown."""

from __future__ import annotations

import asyncio
import itertools
import math
from collections.abc import Sequence
from types import TracebackType
from typing import Any, Literal, Unpack

from . import _metrics
from ._backend import BatchFunction, GenerationBackend, PrepareRequest
from ._config import BatchConfig
from ._engine import GenerationEngine, OneShotEngine, _failed
from ._errors import BatcherClosed, BatcherError, InvalidRequest, Overloaded
from ._request import GenRequest, release
from ._stats import BatcherStats, DrainRate, Histogram
from ._stream import TokenStream
from ._types import (
    OPTION_FIELDS,
    Completion,
    GenerationOptions,
    Prompt,
    SamplingParams,
    check_prompt,
)
from ._worker import WorkerThread

__all__ = ["Batcher"]

State = Literal["new", "starting", "running", "draining", "closed"]
_Engine = GenerationEngine | OneShotEngine


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
        backend: GenerationBackend | BatchFunction | Sequence[GenerationBackend] | Sequence[BatchFunction],
        config: BatchConfig | None = None,
        *,
        registry: Any = None,
        model_name: str | None = None,
    ) -> None:
        backends: list[Any] = list(backend) if isinstance(backend, Sequence) else [backend]
        if not backends:
            raise InvalidRequest("Batcher needs at least one backend", field="backend")
        generative = [hasattr(b, "step") for b in backends]
        if any(generative) and not all(generative):
            raise InvalidRequest(
                "mix of generation backends and batch functions: use one kind per Batcher", field="backend"
            )
        if not all(generative) and not all(callable(b) for b in backends):
            raise InvalidRequest(
                "backend must be a GenerationBackend (with start/prepare/step/close) "
                "or a callable list -> list",
                field="backend",
            )
        self.config = config or BatchConfig()
        self._generative = all(generative)
        first = backends[0]
        self.model_name: str = str(
            model_name
            or getattr(first, "model_name", None)
            or getattr(first, "__name__", type(first).__name__)
        )
        self._registry = registry
        self._drain = DrainRate()
        self._live = 0
        self._idle: asyncio.Future[None] | None = None
        self._engines: list[_Engine] = [
            (GenerationEngine if self._generative else OneShotEngine)(
                i, b, self.config, self._drain, self._request_ended
            )
            for i, b in enumerate(backends)
        ]
        self._host = WorkerThread("batcher-host")
        self._seq = itertools.count(1)
        self._preparing: list[GenRequest] = []
        self._prep_wakeup: asyncio.Future[None] | None = None
        self._prep_task: asyncio.Task[None] | None = None
        self._state: State = "new"
        self._params_cache: dict[tuple[Any, ...], SamplingParams] = {}
        self._loop: asyncio.AbstractEventLoop | None = None

    # -- lifecycle --------------------------------------------------------------------------
    @property
    def state(self) -> State:
        return self._state

    @property
    def ready(self) -> bool:
        """True while the batcher accepts requests (started, not draining)."""
        return self._state == "running"

    async def start(self) -> None:
        """Start the device threads, run each backend's ``start()`` there, start the engines."""
        if self._state != "new":
            raise BatcherClosed(f"cannot start a batcher that is {self._state}: create a new one")
        self._state = "starting"
        self._loop = asyncio.get_running_loop()
        for e in self._engines:
            e.worker.start()
        if self._generative:
            self._host.start()
        try:
            await asyncio.gather(
                *(e.worker.submit(e.backend.start) for e in self._engines if isinstance(e, GenerationEngine))
            )
        except Exception as exc:
            await self._stop_threads()
            self._state = "closed"
            raise BatcherError(
                f"a backend failed to start ({exc!r}): fix the model or device "
                "settings and create a new Batcher"
            ) from exc
        for e in self._engines:
            e.launch()
        if self._generative:
            self._prep_task = self._loop.create_task(self._prepare_loop(), name="batcher-prepare")
        if self._registry is not None:
            _metrics.attach(self._registry, self)
        self._state = "running"

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
        if self._state in ("closed", "draining"):
            return
        if self._state == "new":
            self._state = "closed"
            return
        self._state = "draining"
        loop = asyncio.get_running_loop()
        timeout = self.config.drain_timeout_s if timeout is None else timeout
        if self._live:
            self._idle = loop.create_future()
            try:
                await asyncio.wait_for(asyncio.shield(self._idle), timeout)
            except TimeoutError:
                pass
        error = BatcherClosed(
            f"the batcher shut down before this request finished (drain timeout "
            f"{timeout:g} s): retry it on another replica"
        )
        for req in self._preparing:
            req.finish("shutdown", error=error)
        for e in self._engines:
            e.end_all("shutdown", error)
        self._wake_preparer()
        if self._prep_task is not None:
            await self._prep_task
        await self._stop_threads()
        if self._registry is not None:
            _metrics.detach(self._registry, self)
        self._state = "closed"

    async def _stop_threads(self) -> None:
        for e in self._engines:
            await e.stop()
        await self._host.stop()

    def _request_ended(self) -> None:
        self._live -= 1
        if self._live == 0 and self._idle is not None and not self._idle.done():
            self._idle.set_result(None)

    # -- generation -------------------------------------------------------------------------
    def stream(self, prompt: Prompt, /, **options: Unpack[GenerationOptions]) -> TokenStream:
        """Generate for ``prompt`` (text, or chat messages), streaming :class:`Chunk` deltas.

        Options are validated now (:class:`InvalidRequest` names the bad field); admission
        (:class:`Overloaded`, :class:`BatcherClosed`, :class:`PromptTooLong`) happens on entering
        ``async with`` or at the first iteration. The last chunk carries ``finish_reason`` and
        ``usage``; iteration raises :class:`DeadlineExceeded` or :class:`RequestFailed` if the
        request ends so. Leaving the stream early cancels the request.
        """
        args = self._parse(prompt, dict(options))
        return TokenStream(lambda: self._admit(*args))

    async def generate(self, prompt: Prompt, /, **options: Unpack[GenerationOptions]) -> Completion:
        """Generate for ``prompt`` and return the whole :class:`Completion`."""
        req = self._admit(*self._parse(prompt, dict(options)))
        texts: list[str] = []
        ids: list[int] = []
        try:
            while (chunk := await req.next_chunk()) is not None:
                texts.append(chunk.text)
                ids.extend(chunk.token_ids)
                if chunk.finish_reason is not None:
                    assert chunk.usage is not None
                    return Completion("".join(texts), tuple(ids), chunk.finish_reason, chunk.usage)
        finally:
            req.cancel()
        raise BatcherError("the request ended without a finish reason")  # unreachable by design

    def _parse(
        self, prompt: object, options: dict[str, Any]
    ) -> tuple[Prompt, SamplingParams, float | None, int]:
        """Validate a call's prompt and options (``options`` is the call's own kwargs dict)."""
        try:
            self._require_generative()
            if not options.keys() <= OPTION_FIELDS:
                unknown = sorted(options.keys() - OPTION_FIELDS)
                raise InvalidRequest(
                    f"unknown parameter(s) {unknown}: known are {sorted(OPTION_FIELDS)}", field=unknown[0]
                )
            deadline_s = options.pop("deadline_s", None)
            priority = options.pop("priority", 0)
            params = self._sampling_params(options)
            if deadline_s is not None and (
                type(deadline_s) not in (int, float) or not 0 < deadline_s < math.inf
            ):
                raise InvalidRequest(
                    f"deadline_s must be a positive number of seconds, got {deadline_s!r}", field="deadline_s"
                )
            if type(priority) is not int or not -1_000_000 <= priority <= 1_000_000:
                raise InvalidRequest(
                    f"priority must be an integer in [-1000000, 1000000], got {priority!r}", field="priority"
                )
            if type(prompt) is not str or not prompt or not prompt.isascii():
                prompt = check_prompt(prompt)
            return prompt, params, deadline_s, priority
        except InvalidRequest:
            if self._engines:
                self._least_loaded().count("rejected")
            raise

    def _sampling_params(self, opts: dict[str, Any]) -> SamplingParams:
        """Validated SamplingParams; the few distinct sets a service sees are cached (keyed by
        value and type, so ``True`` never passes for ``1``)."""
        key: tuple[Any, ...] | None = (*opts.items(), *map(type, opts.values()))
        try:
            cached = self._params_cache.get(key)  # type: ignore[arg-type]
        except TypeError:  # an unhashable value (a list of stops): validate without the cache
            key, cached = None, None
        if cached is not None:
            return cached
        stop = opts.get("stop")
        opts["stop"] = (stop,) if isinstance(stop, str) else tuple(stop or ())
        opts.setdefault("max_tokens", self.config.default_max_tokens)
        if isinstance(opts["max_tokens"], int) and opts["max_tokens"] > self.config.max_tokens_limit:
            raise InvalidRequest(
                f"max_tokens must be <= {self.config.max_tokens_limit} (the "
                f"batcher's max_tokens_limit), got {opts['max_tokens']}",
                field="max_tokens",
            )
        params = SamplingParams(**opts)
        if key is not None and len(self._params_cache) < 1024:
            self._params_cache[key] = params
        return params

    def _require_generative(self) -> None:
        if not self._generative:
            raise InvalidRequest(
                "this batcher serves a one-shot batch function: use infer(), or "
                "pass a GenerationBackend to stream()/generate()",
                field="backend",
            )

    def _admit(
        self, prompt: Prompt, params: SamplingParams, deadline_s: float | None, priority: int
    ) -> GenRequest:
        engine = self._check_admission()
        assert isinstance(engine, GenerationEngine) and self._loop is not None
        req = GenRequest(
            self._loop,
            next(self._seq),
            prompt,
            params,
            priority=priority,
            deadline_s=deadline_s,
            engine=engine,
        )
        engine.add_preparing()
        self._live += 1
        self._preparing.append(req)
        if len(self._preparing) == 1:
            self._wake_preparer()
        return req

    def _check_admission(self) -> _Engine:
        engine = self._least_loaded()
        if self._state != "running":
            engine.count("shutdown")
            raise BatcherClosed(self._closed_message())
        if self.queue_depth >= self.config.max_queue:
            engine.count("overloaded")
            retry = self.retry_after()
            raise Overloaded(
                f"queue is full (max_queue={self.config.max_queue}): retry in "
                f"{retry:.2g} s, or raise max_queue",
                retry_after=retry,
            )
        return engine

    def _closed_message(self) -> str:
        if self._state in ("new", "starting"):
            return "the batcher is not started: use `async with Batcher(...)` or await start()"
        return f"the batcher is {self._state}: send the request to another replica"

    @property
    def queue_depth(self) -> int:
        """Requests admitted and not yet running, over all engines."""
        engines = self._engines
        return engines[0].queue_depth if len(engines) == 1 else sum(e.queue_depth for e in engines)

    def _least_loaded(self) -> _Engine:
        engines = self._engines
        return engines[0] if len(engines) == 1 else min(engines, key=lambda e: e.load)

    def retry_after(self) -> float:
        """Seconds until the queue has likely drained enough to admit one more request."""
        assert self._loop is not None
        rate = self._drain.per_second(self._loop.time())
        queued = self.queue_depth
        if rate <= 0:
            return 1.0
        return min(max((queued - self.config.max_queue + 1) / rate, 0.05), 60.0)

    # -- tokenization on the host thread -----------------------------------------------------
    def _wake_preparer(self) -> None:
        waiter, self._prep_wakeup = self._prep_wakeup, None
        release(waiter)

    async def _prepare_loop(self) -> None:
        """Tokenize admitted requests in batches on the host thread, then queue them on their
        engine. Ends once the batcher drains and no admitted request is left."""
        assert self._loop is not None
        while True:
            if not self._preparing:
                if self._state == "draining" and not self._live:
                    return
                self._prep_wakeup = self._loop.create_future()
                await self._prep_wakeup
                continue
            batch, self._preparing = self._preparing, []
            batch = [r for r in batch if not r.done]
            for engine in {id(r.engine): r.engine for r in batch}.values():
                await self._prepare(engine, [r for r in batch if r.engine is engine])

    async def _prepare(self, engine: GenerationEngine, reqs: list[GenRequest]) -> None:
        try:
            results = await self._host.submit(
                engine.backend.prepare, [PrepareRequest(r.prompt, r.params) for r in reqs]
            )
            if len(results) != len(reqs):
                raise TypeError(f"prepare() returned {len(results)} results for {len(reqs)} requests")
        except Exception as e:
            error = _failed("the backend failed to prepare this request", e)
            for r in reqs:
                r.finish("failed", error=error)
            return
        for r, res in zip(reqs, results, strict=True):
            if r.done:
                continue
            if isinstance(res, BaseException):
                r.finish("rejected" if isinstance(res, InvalidRequest) else "failed", error=res)
            elif not res.token_ids:
                r.finish(
                    "rejected",
                    error=InvalidRequest("the prompt tokenized to no tokens: send some text", field="prompt"),
                )
            else:
                r.prepared(tuple(res.token_ids))
                engine.enqueue(r)

    # -- one-shot ---------------------------------------------------------------------------
    async def infer(self, item: Any) -> Any:
        """Run ``item`` through the one-shot batch function, batched with concurrent calls."""
        if self._generative:
            raise InvalidRequest(
                "this batcher serves a generation backend: use stream() or "
                "generate(), or pass a batch function for infer()",
                field="backend",
            )
        engine = self._check_admission()
        assert isinstance(engine, OneShotEngine) and self._loop is not None
        self._live += 1
        it = engine.submit(item, self._loop)
        try:
            return await it.future
        except asyncio.CancelledError:
            if it.future.cancelled():  # the caller left: the engine skips or discards the item
                engine.count("cancelled", self._loop.time() - it.arrival)
                self._request_ended()
            raise

    # -- statistics -------------------------------------------------------------------------
    def stats(self) -> BatcherStats:
        """A snapshot of queue, batch and outcome statistics summed over the engines."""
        engines = [e.stats for e in self._engines]
        outcomes = {k: sum(s.outcomes[k] for s in engines) for k in engines[0].outcomes}
        ttft = Histogram(engines[0].ttft.bounds)
        batch = Histogram(engines[0].batch_size.bounds)
        for s in engines:
            ttft.counts = [a + b for a, b in zip(ttft.counts, s.ttft.counts, strict=True)]
            batch.counts = [a + b for a, b in zip(batch.counts, s.batch_size.counts, strict=True)]
            batch.sum += s.batch_size.sum
        return BatcherStats(
            queue_depth=sum(e.queue_depth for e in self._engines),
            running=sum(e.running for e in self._engines),
            outcomes=outcomes,
            generated_tokens=sum(s.generated_tokens for s in engines),
            prompt_tokens=sum(s.prompt_tokens for s in engines),
            steps=sum(s.steps for s in engines),
            busy_seconds=sum(s.busy_seconds for s in engines),
            mean_batch_size=batch.sum / batch.count if batch.count else 0.0,
            ttft_p50=ttft.quantile(0.5),
            ttft_p99=ttft.quantile(0.99),
        )
