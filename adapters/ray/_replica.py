"""One replica: the example server's app (``create_app``, one :class:`batcher.Batcher`) behind a handle.

The front relays each HTTP request here as a plain dict; :meth:`BatcherReplica.http` runs it
through the app in this process and streams back the ASGI messages the app sends, in batches, as
they come. The replica adds ``x-llm-batcher-replica: <replica id>`` to every response. When the
caller goes away (the client disconnected and the front cancelled the call), the app's task is
cancelled: the server's SSE response closes its batcher stream and the request leaves the batch at
the next step.

Life: the constructor builds one backend per device (off the event loop), starts the app's
lifespan and returns once the batcher is ready, so Serve routes nothing to a replica that is still
loading. On scale-down Serve stops routing to the replica and waits for its streams to finish;
``__del__`` then runs the app's shutdown, which drains through ``Batcher.aclose(timeout)``.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
from collections.abc import AsyncIterator, Callable
from typing import Any

from prometheus_client import CollectorRegistry, Gauge
from ray import serve
from ray.serve.handle import DeploymentHandle
from starlette.types import ASGIApp, Message

from batcher.testing import FakeBackend

from ..server import ServerSettings, create_app
from ._autoscale import WORK_METRIC
from ._metrics import labelled

__all__ = ["REPLICA_HEADER", "BatcherReplica", "make_backends"]

log = logging.getLogger("llm_batcher.ray")

REPLICA_HEADER = b"x-llm-batcher-replica"
_END: Message = {"type": "relay.end"}


def make_backends(settings: ServerSettings, devices: int) -> list[Any]:
    """One backend per device: fake ones, or ``HFBackend`` on ``cuda:0..N-1`` (the GPUs Ray gave
    this replica) or N times on the CPU. Loads the model: call it off the event loop."""
    if settings.model == "fake":
        return [
            FakeBackend(step_time_s=settings.fake_step_s, step_time_per_seq_s=settings.fake_step_per_seq_s)
            for _ in range(devices)
        ]
    from ..hf import HFBackend

    device = settings.device or "cpu"
    names = [f"cuda:{i}" for i in range(devices)] if device.startswith("cuda") else [device] * devices
    return [HFBackend(settings.model, dtype=settings.dtype or "auto", device=name) for name in names]


class _Lifespan:
    """Drives an ASGI app's lifespan protocol (startup, then shutdown) from inside this process."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app
        self.inbox: asyncio.Queue[Message] = asyncio.Queue()
        self.outbox: asyncio.Queue[Message] = asyncio.Queue()
        self.task: asyncio.Task[None] | None = None

    async def _send(self, message: Message) -> None:
        await self.outbox.put(message)

    async def _run(self, scope: dict[str, Any]) -> None:
        await self.app(scope, self.inbox.get, self._send)

    async def startup(self) -> None:
        scope = {"type": "lifespan", "asgi": {"version": "3.0"}, "state": {}}
        self.task = asyncio.get_running_loop().create_task(self._run(scope))
        await self._step("startup")

    async def shutdown(self) -> None:
        if self.task is not None and not self.task.done():
            await self._step("shutdown")
            await self.task

    async def _step(self, phase: str) -> None:
        await self.inbox.put({"type": f"lifespan.{phase}"})
        reply = await self.outbox.get()
        if reply["type"] != f"lifespan.{phase}.complete":
            raise RuntimeError(f"the app's lifespan {phase} failed: {reply.get('message', reply)}")


@serve.deployment(name="BatcherReplica")
class BatcherReplica:
    """A Serve replica owning one Batcher (one engine per device) inside the example server's app."""

    async def __init__(  # type: ignore[misc]  # Serve awaits an async constructor
        self, settings: ServerSettings, devices: int, hub: DeploymentHandle[Any], metrics_period_s: float
    ) -> None:
        self.replica_id = serve.get_replica_context().replica_tag
        self.registry = CollectorRegistry()
        info = Gauge(
            "batcher_replica_info", "1 per live replica; pid is its process", ["pid"], registry=self.registry
        )
        info.labels(str(os.getpid())).set(1)
        backends = await asyncio.to_thread(make_backends, settings, devices)
        factory: Callable[[], Any] = (lambda: backends) if devices > 1 else (lambda: backends[0])
        self.app = create_app(settings, registry=self.registry, backend_factory=factory)
        self.state: Any = self.app.state  # type: ignore[attr-defined]
        self.lifespan = _Lifespan(self.app)
        await self.lifespan.startup()
        await self._until_loaded()
        self.hub = hub
        self.period_s = metrics_period_s
        self.pusher = asyncio.get_running_loop().create_task(self._push_metrics())
        log.info("replica %s ready (pid %d, %d engine(s))", self.replica_id, os.getpid(), devices)

    async def _until_loaded(self) -> None:
        # The app loads its batcher in a task of its own lifespan and offers no event for it; the
        # backends are built already, so this only waits for the engines' start (a few steps).
        while self.state.batcher is None:
            if self.state.load_error is not None:
                raise RuntimeError(f"the replica could not start its batcher: {self.state.load_error!r}")
            await asyncio.sleep(0.02)

    # -- requests ----------------------------------------------------------------------------
    async def http(self, request: dict[str, Any]) -> AsyncIterator[list[Message]]:
        """Run one HTTP request through the app; yield the ASGI messages it sends, in batches."""
        out: asyncio.Queue[Message] = asyncio.Queue(maxsize=256)
        body_sent = False
        never: asyncio.Future[None] = asyncio.get_running_loop().create_future()

        async def receive() -> Message:
            nonlocal body_sent
            if not body_sent:
                body_sent = True
                return {"type": "http.request", "body": request["body"], "more_body": False}
            await never  # the whole body was sent: wait until the app is cancelled (caller left)
            return {"type": "http.disconnect"}

        async def send(message: Message) -> None:
            if message["type"] == "http.response.start":
                headers = [*message.get("headers", []), (REPLICA_HEADER, self.replica_id.encode())]
                message = {**message, "headers": headers}
            await out.put(message)

        task = asyncio.get_running_loop().create_task(_call(self.app, _scope(request), receive, send))
        task.add_done_callback(lambda _: out.put_nowait(_END) if not out.full() else None)
        try:
            async for batch in _batches(out, task):
                yield batch
            task.result()  # an error of the app itself (the server maps its own errors)
        finally:
            if not task.done():
                task.cancel()
                await asyncio.wait([task])

    # -- what Serve asks of a replica -----------------------------------------------------------
    def _work(self) -> int:
        batcher = self.state.batcher
        if batcher is None:
            return 0
        stats = batcher.stats()
        return int(stats.queue_depth + stats.running)

    def record_routing_stats(self) -> dict[str, Any]:
        """For :class:`LeastQueuedRouter`: the requests this replica's batcher has waiting or running."""
        return {"work": self._work()}

    def record_autoscaling_stats(self) -> dict[str, float]:
        """For :func:`queue_depth_policy`: the same work, averaged by Serve over its look-back window."""
        return {WORK_METRIC: float(self._work())}

    def check_health(self) -> None:
        """Serve restarts a replica whose batcher failed to load."""
        if self.state.load_error is not None:
            raise RuntimeError(f"the replica's batcher failed to load: {self.state.load_error!r}")

    async def _push_metrics(self) -> None:
        while True:
            push = self.hub.push.remote(self.replica_id, labelled(self.registry, self.replica_id))
            try:
                await asyncio.wait_for(push, timeout=max(self.period_s, 1.0))
            except Exception:
                log.warning("could not push metrics to the hub (retrying)", exc_info=True)
            await asyncio.sleep(self.period_s)

    async def __del__(self) -> None:
        """Scale-down or shutdown: stop pushing, leave the hub, drain the batcher (app shutdown)."""
        self.pusher.cancel()
        await asyncio.wait([self.pusher])
        with contextlib.suppress(Exception):  # the hub may be stopping too: never wait long on it
            await asyncio.wait_for(self.hub.forget.remote(self.replica_id), timeout=1.0)
        await self.lifespan.shutdown()
        log.info("replica %s drained and stopped", self.replica_id)


async def _batches(out: asyncio.Queue[Message], task: asyncio.Task[None]) -> AsyncIterator[list[Message]]:
    """The messages in ``out`` as they come, grouped (whatever is queued at once) to save hops."""
    while True:
        message = await out.get()
        if message is _END:
            return
        batch = [message]
        while not out.empty():
            message = out.get_nowait()
            if message is _END:
                yield batch
                return
            batch.append(message)
        yield batch
        if task.done() and out.empty():
            return


async def _call(app: ASGIApp, scope: dict[str, Any], receive: Any, send: Any) -> None:
    await app(scope, receive, send)


def _scope(request: dict[str, Any]) -> dict[str, Any]:
    """The ASGI HTTP scope of a relayed request."""
    path: str = request["path"]
    return {
        "type": "http",
        "asgi": {"version": "3.0", "spec_version": "2.3"},
        "http_version": "1.1",
        "method": request["method"],
        "scheme": "http",
        "path": path,
        "raw_path": path.encode(),
        "query_string": request["query_string"],
        "root_path": "",
        "headers": [(bytes(k), bytes(v)) for k, v in request["headers"]],
        "client": request.get("client"),
        "server": None,
        "state": {},
    }
