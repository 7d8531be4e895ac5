"""ASGI plumbing of the example server: the gate middleware and a disconnect-aware response.

``Gate`` wraps the whole app and does, in order: count every response in
``batcher_http_requests_total{path,status,tenant}``; refuse bodies over the size limit (413);
refuse new API work while loading or draining (503); check the bearer token of ``/v1/*`` (and of
the docs, when they are on) and attach the key's tenant to the request (:class:`RequestContext`,
``request_context(scope)``); count the requests it or the app refused before the batcher saw them,
so that ``/metrics`` reports them as ``batcher_requests_total{outcome="rejected"}``
(:class:`WithServerRejections`). ``/health``, ``/ready`` and ``/metrics`` stay open (a scraper or
a probe needs no key, and they carry no user data).

``EventStream`` sends server-sent events while watching the connection: an ``http.disconnect``
cancels the body at once, even while it waits for the next token, so the request leaves the batch
at the next step instead of when the next write would fail. ``until_disconnect`` does the same for
non-streaming work. Both register in a :class:`LiveSet`, which a second signal aborts: a stream
then still gets an error event and ``[DONE]``, a plain request a 503.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from contextlib import AsyncExitStack, asynccontextmanager
from dataclasses import dataclass
from typing import Any, TypeVar

import anyio
from prometheus_client import CollectorRegistry, Counter
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from batcher import BatcherClosed

from ._auth import DEFAULT_TENANT, KeyRing
from ._openai import error_body

__all__ = [
    "CLIENT_CLOSED",
    "DOCS_PATHS",
    "FORCED",
    "EventStream",
    "Gate",
    "LiveSet",
    "RequestContext",
    "WithServerRejections",
    "request_context",
    "until_disconnect",
]

T = TypeVar("T")

#: Path labels: anything else is counted as "other", so scanners cannot blow up the label set.
GENERATION_PATHS = frozenset({"/v1/completions", "/v1/chat/completions"})
KNOWN_PATHS = GENERATION_PATHS | {"/v1/models", "/health", "/ready", "/metrics"}
DOCS_PATHS = frozenset({"/docs", "/docs/oauth2-redirect", "/redoc", "/openapi.json"})
#: "Client closed request": the status we count when the client left before any response.
CLIENT_CLOSED = 499
#: Statuses of a generation request refused for what it asks (bad field, unknown model, too big).
REFUSED = frozenset({400, 404, 413})
FORCED = "the server was stopped (second signal) before this request finished: retry it elsewhere"
_CONTEXT_KEY = "llm_batcher.request"


@dataclass
class RequestContext:
    """Request-scoped facts the gate establishes: who is asking (the API key's tenant and its
    weight, for fair queuing later) and whether the batcher saw the request (then the batcher,
    not the server, counts its refusal)."""

    tenant: str = DEFAULT_TENANT
    weight: float = 1.0
    admitted: bool = False


def request_context(scope: Scope) -> RequestContext:
    """The :class:`RequestContext` the gate attached to this request (a fresh one outside it)."""
    ctx = scope.get(_CONTEXT_KEY)
    return ctx if isinstance(ctx, RequestContext) else RequestContext()


class _BodyTooLarge(Exception):
    pass


class Gate:
    """Metrics, body limit, availability and auth, for every HTTP request (see module doc)."""

    def __init__(
        self,
        app: ASGIApp,
        *,
        registry: CollectorRegistry,
        max_body_bytes: Callable[[], int],
        keys: KeyRing,
        unavailable: Callable[[], str | None],
        protected: frozenset[str] = frozenset(),
    ) -> None:
        self.app = app
        self.max_body_bytes = max_body_bytes
        self.keys = keys
        self.unavailable = unavailable
        self.protected = protected
        #: Generation requests refused before the batcher saw them (see ``WithServerRejections``).
        self.rejected = 0
        self.requests = Counter(
            "batcher_http_requests",
            "HTTP responses of the example server, by path, status and API-key tenant",
            ["path", "status", "tenant"],
            registry=registry,
        )

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        path = scope["path"]
        ctx = scope[_CONTEXT_KEY] = RequestContext()
        status = CLIENT_CLOSED

        async def counting_send(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self._gated(scope, receive, counting_send, ctx)
        finally:
            label = path if path in KNOWN_PATHS else "other"
            self.requests.labels(label, str(status), ctx.tenant).inc()
            if path in GENERATION_PATHS and status in REFUSED and not ctx.admitted:
                self.rejected += 1

    async def _gated(self, scope: Scope, receive: Receive, send: Send, ctx: RequestContext) -> None:
        path = scope["path"]
        limit = self.max_body_bytes()
        declared = _content_length(scope)
        if declared is not None and declared > limit:
            await _too_large(send, limit)
            return
        needs_key = path.startswith("/v1/") or path in self.protected
        if needs_key and self.keys:
            key = self.keys.find(_bearer(scope))
            if key is None:
                await send_error(
                    send,
                    401,
                    "missing or wrong API key: send 'Authorization: Bearer <key>'",
                    type="invalid_request_error",
                    code="invalid_api_key",
                    headers=[(b"www-authenticate", b"Bearer")],
                )
                return
            ctx.tenant, ctx.weight = key.tenant, key.weight
        why = self.unavailable() if path.startswith("/v1/") else None
        if why is not None:
            message = (
                "the server is shutting down: send the request elsewhere"
                if why == "draining"
                else "the model is still loading: retry when GET /ready answers 200"
            )
            await send_error(
                send, 503, message, type="service_unavailable", code=why, headers=[(b"retry-after", b"1")]
            )
            return
        await self._limited(scope, receive, send, limit)

    async def _limited(self, scope: Scope, receive: Receive, send: Send, limit: int) -> None:
        received = 0
        too_large = replied = False

        async def limited_receive() -> Message:
            nonlocal received, too_large
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > limit:
                    too_large = True
                    raise _BodyTooLarge
            return message

        async def guarded_send(message: Message) -> None:
            # Once the body overflowed, whatever the app answers (FastAPI turns the error into
            # its own 400) is replaced by one 413.
            nonlocal replied
            if not too_large:
                await send(message)
            elif not replied:
                replied = True
                await _too_large(send, limit)

        try:
            await self.app(scope, limited_receive, guarded_send)
        except _BodyTooLarge:
            pass
        if too_large and not replied:
            await _too_large(send, limit)


def _bearer(scope: Scope) -> bytes | None:
    for name, value in scope["headers"]:
        if name == b"authorization":
            scheme, _, token = value.partition(b" ")
            return token.strip() if scheme.lower() == b"bearer" else None
    return None


def _content_length(scope: Scope) -> int | None:
    for name, value in scope["headers"]:
        if name == b"content-length":
            try:
                return int(value)
            except ValueError:
                return None
    return None


async def _too_large(send: Send, limit: int) -> None:
    await send_error(
        send,
        413,
        f"request body is larger than {limit} bytes (derived from the model's context): "
        "send a shorter prompt",
        type="invalid_request_error",
        code="request_too_large",
    )


async def send_error(
    send: Send,
    status: int,
    message: str,
    *,
    type: str,
    code: str | None = None,
    param: str | None = None,
    headers: list[tuple[bytes, bytes]] | None = None,
) -> None:
    """Send a whole OpenAI-style JSON error response."""
    body = json.dumps(error_body(message, type=type, param=param, code=code)).encode()
    head = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    await send({"type": "http.response.start", "status": status, "headers": head + (headers or [])})
    await send({"type": "http.response.body", "body": body})


class WithServerRejections:
    """A registry view for ``generate_latest``: the registry's families, with the gate's count of
    server-side refusals added to ``batcher_requests_total{outcome="rejected"}`` (of the first
    engine; a sample of its own while no batcher is attached). The core counts the refusals it
    makes itself; the gate counts only those the batcher never saw, so nothing counts twice."""

    def __init__(self, registry: CollectorRegistry, gate: Gate, model: str) -> None:
        self.registry = registry
        self.gate = gate
        self.model = model

    def collect(self) -> Iterator[Any]:
        for family in self.registry.collect():
            if family.name == "batcher_requests":
                self._merge(family)
            yield family

    def _merge(self, family: Any) -> None:
        extra = float(self.gate.rejected)
        for i, sample in enumerate(family.samples):
            if sample.name.endswith("_total") and sample.labels.get("outcome") == "rejected":
                family.samples[i] = sample._replace(value=sample.value + extra)
                return
        if extra:  # no batcher attached (still loading): labels as the core spells them
            family.add_metric([self.model, "0", "rejected"], extra)


class _Watch:
    """Listens for ``http.disconnect``, then cancels ``scope``; remembers that it did. ``abort()``
    cancels it too (a second signal)."""

    def __init__(self, receive: Receive, scope: anyio.CancelScope) -> None:
        self.receive = receive
        self.scope = scope
        self.disconnected = False
        self.aborted = False

    async def __call__(self) -> None:
        while (await self.receive())["type"] != "http.disconnect":
            pass
        self.disconnected = True
        self.scope.cancel()

    def abort(self) -> None:
        self.aborted = True
        self.scope.cancel()


class LiveSet:
    """The responses that a second signal must still end properly; ``wait_empty`` waits (on an
    event, not by polling) until they have."""

    def __init__(self) -> None:
        self._watches: set[_Watch] = set()
        self._empty: asyncio.Event | None = None

    def __len__(self) -> int:
        return len(self._watches)

    def add(self, watch: _Watch) -> None:
        self._watches.add(watch)

    def discard(self, watch: _Watch) -> None:
        self._watches.discard(watch)
        if not self._watches and self._empty is not None:
            self._empty.set()

    def abort_all(self) -> None:
        for watch in list(self._watches):
            watch.abort()

    async def wait_empty(self, timeout: float) -> None:
        if not self._watches:
            return
        self._empty = asyncio.Event()
        try:
            await asyncio.wait_for(self._empty.wait(), timeout)
        except TimeoutError:
            pass


@asynccontextmanager
async def cancel_on_disconnect(receive: Receive, live: LiveSet | None = None) -> AsyncIterator[_Watch]:
    """Run the body in this task; a client disconnect (or ``live.abort_all()``) cancels it, and
    the block exits quietly.

    The listener is a plain child task, not a task group: an error of the body must propagate as
    itself, not wrapped in an ``ExceptionGroup``.
    """
    with anyio.CancelScope() as scope:
        watch = _Watch(receive, scope)
        listener = asyncio.get_running_loop().create_task(watch())
        if live is not None:
            live.add(watch)
        try:
            yield watch
        finally:
            listener.cancel()
    await asyncio.wait([listener])


async def until_disconnect(
    receive: Receive, work: Callable[[], Awaitable[T]], live: LiveSet | None = None
) -> T | None:
    """Await ``work()``; cancel it and return None if the client disconnects first, raise
    :class:`BatcherClosed` if a second signal aborts it."""
    async with cancel_on_disconnect(receive, live) as watch:
        try:
            return await work()
        finally:
            if live is not None:
                live.discard(watch)
    if watch.aborted:
        raise BatcherClosed(FORCED)
    return None


class EventStream:
    """A ``text/event-stream`` response over ``events``; ``resources`` close when it ends.

    The events are iterated in the task that runs the response (so the context managers entered
    by the endpoint exit in the task they were entered in); a child task only listens for
    ``http.disconnect``. If ``live`` aborts it, ``on_abort`` (an error event and ``[DONE]``) is
    the last thing sent.
    """

    def __init__(
        self,
        events: AsyncIterator[bytes],
        resources: AsyncExitStack,
        *,
        live: LiveSet | None = None,
        on_abort: bytes = b"",
    ) -> None:
        self.events = events
        self.resources = resources
        self.live = live
        self.on_abort = on_abort

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        watch: _Watch | None = None
        try:
            await send(
                {
                    "type": "http.response.start",
                    "status": 200,
                    "headers": [
                        (b"content-type", b"text/event-stream; charset=utf-8"),
                        (b"cache-control", b"no-cache"),
                        (b"x-accel-buffering", b"no"),
                    ],
                }
            )
            async with cancel_on_disconnect(receive, self.live) as watch:
                async for data in self.events:
                    await send({"type": "http.response.body", "body": data, "more_body": True})
            if watch.aborted and not watch.disconnected:
                await send({"type": "http.response.body", "body": self.on_abort, "more_body": True})
            if not watch.disconnected:
                await send({"type": "http.response.body", "body": b"", "more_body": False})
        finally:
            await self.resources.aclose()
            if self.live is not None and watch is not None:
                self.live.discard(watch)
