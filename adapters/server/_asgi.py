"""ASGI plumbing of the example server: the gate middleware and a disconnect-aware response.

``Gate`` wraps the whole app and does, in order: count every response in
``batcher_http_requests_total{path,status}``; refuse bodies over the size limit (413); refuse new
API work while draining (503); check the bearer token of ``/v1/*`` (401). ``/health``, ``/ready``
and ``/metrics`` stay open (a scraper or a probe needs no key, and they carry no user data).

``EventStream`` sends server-sent events while watching the connection: an ``http.disconnect``
cancels the body at once, even while it waits for the next token, so the request leaves the batch
at the next step instead of when the next write would fail. ``until_disconnect`` does the same for
non-streaming work.
"""

from __future__ import annotations

import asyncio
import hmac
import json
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import AsyncExitStack, asynccontextmanager
from typing import TypeVar

import anyio
from prometheus_client import CollectorRegistry, Counter
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from ._openai import error_body

__all__ = ["EventStream", "Gate", "until_disconnect"]

T = TypeVar("T")

#: Path labels: anything else is counted as "other", so scanners cannot blow up the label set.
KNOWN_PATHS = frozenset(
    {"/v1/completions", "/v1/chat/completions", "/v1/models", "/health", "/ready", "/metrics"}
)
#: "Client closed request": the status we count when the client left before any response.
CLIENT_CLOSED = 499


class _BodyTooLarge(Exception):
    pass


class Gate:
    """Metrics, body limit, drain and auth, for every HTTP request (see module doc)."""

    def __init__(
        self,
        app: ASGIApp,
        *,
        registry: CollectorRegistry,
        max_body_bytes: int,
        api_key: str | None,
        draining: Callable[[], bool],
    ) -> None:
        self.app = app
        self.max_body_bytes = max_body_bytes
        self.api_key = api_key.encode() if api_key else None
        self.draining = draining
        self.requests = Counter(
            "batcher_http_requests",
            "HTTP responses of the example server, by path and status",
            ["path", "status"],
            registry=registry,
        )

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        path = scope["path"]
        status = CLIENT_CLOSED

        async def counting_send(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self._gated(scope, receive, counting_send)
        finally:
            label = path if path in KNOWN_PATHS else "other"
            self.requests.labels(label, str(status)).inc()

    async def _gated(self, scope: Scope, receive: Receive, send: Send) -> None:
        path = scope["path"]
        declared = _content_length(scope)
        if declared is not None and declared > self.max_body_bytes:
            await _too_large(send, self.max_body_bytes)
            return
        if path.startswith("/v1/") and self.draining():
            await send_error(
                send,
                503,
                "the server is shutting down: send the request elsewhere",
                type="service_unavailable",
                code="draining",
                headers=[(b"retry-after", b"1")],
            )
            return
        if path.startswith("/v1/") and self.api_key is not None and not self._authorized(scope):
            await send_error(
                send,
                401,
                "missing or wrong API key: send 'Authorization: Bearer <key>'",
                type="invalid_request_error",
                code="invalid_api_key",
                headers=[(b"www-authenticate", b"Bearer")],
            )
            return
        received = 0
        too_large = replied = False

        async def limited_receive() -> Message:
            nonlocal received, too_large
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.max_body_bytes:
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
                await _too_large(send, self.max_body_bytes)

        try:
            await self.app(scope, limited_receive, guarded_send)
        except _BodyTooLarge:
            pass
        if too_large and not replied:
            await _too_large(send, self.max_body_bytes)

    def _authorized(self, scope: Scope) -> bool:
        assert self.api_key is not None
        for name, value in scope["headers"]:
            if name == b"authorization":
                scheme, _, token = value.partition(b" ")
                return scheme.lower() == b"bearer" and hmac.compare_digest(token.strip(), self.api_key)
        return False


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
        f"request body is larger than {limit} bytes: send a shorter prompt",
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


class _Watch:
    """Listens for ``http.disconnect``, then cancels ``scope``; remembers that it did."""

    def __init__(self, receive: Receive, scope: anyio.CancelScope) -> None:
        self.receive = receive
        self.scope = scope
        self.disconnected = False

    async def __call__(self) -> None:
        while (await self.receive())["type"] != "http.disconnect":
            pass
        self.disconnected = True
        self.scope.cancel()


@asynccontextmanager
async def cancel_on_disconnect(receive: Receive) -> AsyncIterator[_Watch]:
    """Run the body in this task; a client disconnect cancels it (and the block exits quietly).

    The listener is a plain child task, not a task group: an error of the body must propagate as
    itself, not wrapped in an ``ExceptionGroup``.
    """
    with anyio.CancelScope() as scope:
        watch = _Watch(receive, scope)
        listener = asyncio.get_running_loop().create_task(watch())
        try:
            yield watch
        finally:
            listener.cancel()
    await asyncio.wait([listener])


async def until_disconnect(receive: Receive, work: Callable[[], Awaitable[T]]) -> T | None:
    """Await ``work()``; cancel it and return None if the client disconnects first."""
    async with cancel_on_disconnect(receive):
        return await work()
    return None


class EventStream:
    """A ``text/event-stream`` response over ``events``; ``resources`` close when it ends.

    The events are iterated in the task that runs the response (so the context managers entered
    by the endpoint exit in the task they were entered in); a child task only listens for
    ``http.disconnect``.
    """

    def __init__(self, events: AsyncIterator[bytes], resources: AsyncExitStack) -> None:
        self.events = events
        self.resources = resources

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
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
            async with cancel_on_disconnect(receive) as watch:
                async for data in self.events:
                    await send({"type": "http.response.body", "body": data, "more_body": True})
            if not watch.disconnected:
                await send({"type": "http.response.body", "body": b"", "more_body": False})
        finally:
            await self.resources.aclose()
