"""The HTTP ingress: relays each request to a batcher replica and streams the response back.

Serve's proxy hands every HTTP request to :class:`Front` (one light replica, no CPU reserved).
The front reads the body and calls ``BatcherReplica.http`` through a streaming handle, whose
request router picks the replica with the least queued work; the replica runs the example
server's own app, so the API, its errors, auth and SSE format are exactly those of
``llm-batcher serve``. The front adds what one process could not do:

- a replica that dies mid-stream (crash, node lost, killed) ends each of its SSE streams with one
  ``data: {"error": ...}`` event and ``data: [DONE]`` as soon as Ray reports the death, instead of
  a connection cut; before any byte was sent the client gets 503 with ``Retry-After``;
- Serve's own queue in front of the replicas being full gives 429 with ``Retry-After``;
- ``GET /metrics`` answers with every replica's metrics (see :mod:`._metrics`).

A client that disconnects makes Serve's proxy cancel the front's call; the front cancels the
replica's call, which cancels the request inside the replica's batcher.
"""

from __future__ import annotations

import json
import logging
from typing import Any, cast

from ray import serve
from ray.exceptions import RayError
from ray.serve.exceptions import BackPressureError, RayServeException
from ray.serve.handle import DeploymentHandle, DeploymentResponseGenerator
from starlette.types import Message, Receive, Scope, Send

from ._metrics import CONTENT_TYPE_LATEST

__all__ = ["Front", "Relay"]

log = logging.getLogger("llm_batcher.ray")


def _error(message: str, *, type: str, code: str) -> bytes:
    """An OpenAI-style error body (the shape the example server sends)."""
    return json.dumps({"error": {"message": message, "type": type, "param": None, "code": code}}).encode()


_REPLICA_LOST = (
    "the replica serving this request stopped before it finished (it crashed or its node was lost): "
    "retry the request"
)


class Relay:
    """The front's ASGI app (see the module doc)."""

    def __init__(
        self, replicas: DeploymentHandle[Any], hub: DeploymentHandle[Any], max_body_bytes: int
    ) -> None:
        self.replicas = replicas.options(stream=True)
        self.hub = hub
        self.max_body_bytes = max_body_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "lifespan":
            await _lifespan(receive, send)
            return
        if scope["type"] != "http":
            return
        if scope["path"] == "/metrics" and scope["method"] == "GET":
            body = await self.hub.render.remote()
            await _respond(send, 200, body, CONTENT_TYPE_LATEST.encode())
            return
        request = {
            "method": scope["method"],
            "path": scope["path"],
            "query_string": scope.get("query_string", b""),
            "headers": list(scope.get("headers", [])),
            "client": scope.get("client"),
            "body": await self._body(receive),
        }
        await self._relay(request, send)

    async def _body(self, receive: Receive) -> bytes:
        """The request body, cut one byte past the limit (the replica's gate then answers 413)."""
        parts, size = [], 0
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                return b""
            chunk = message.get("body", b"")
            parts.append(chunk)
            size += len(chunk)
            if not message.get("more_body", False) or size > self.max_body_bytes:
                return b"".join(parts)[: self.max_body_bytes + 1]

    async def _relay(self, request: dict[str, Any], send: Send) -> None:
        started = sse = finished = False
        response = cast(DeploymentResponseGenerator[Any], self.replicas.http.remote(request))
        try:
            async for batch in response:
                for message in batch:
                    if message["type"] == "http.response.start":
                        started = True
                        sse = _is_sse(message)
                    elif message["type"] == "http.response.body" and not message.get("more_body", False):
                        finished = True
                    await send(message)
        except BackPressureError as e:
            log.info("replicas full: 429 (%s)", e)
            await _respond(
                send,
                429,
                _error(
                    "every replica is full and Serve's queue too: retry later, or add replicas",
                    type="overloaded_error",
                    code="queue_full",
                ),
                retry=True,
            )
        except (RayError, RayServeException) as e:
            log.warning("replica lost during %s %s: %r", request["method"], request["path"], e)
            await self._replica_lost(send, started=started, sse=sse, finished=finished)
        finally:
            response.cancel()  # type: ignore[no-untyped-call]  # a no-op when the call finished; stops the replica's work otherwise

    async def _replica_lost(self, send: Send, *, started: bool, sse: bool, finished: bool) -> None:
        if not started:
            body = _error(_REPLICA_LOST, type="service_unavailable", code="replica_unavailable")
            await _respond(send, 503, body, retry=True)
        elif sse and not finished:
            event = b"data: " + _error(_REPLICA_LOST, type="server_error", code="replica_lost") + b"\n\n"
            await send({"type": "http.response.body", "body": event + b"data: [DONE]\n\n", "more_body": True})
            await send({"type": "http.response.body", "body": b"", "more_body": False})
        elif not finished:
            await send({"type": "http.response.body", "body": b"", "more_body": False})


def _is_sse(start: Message) -> bool:
    return any(
        k.lower() == b"content-type" and v.startswith(b"text/event-stream")
        for k, v in start.get("headers", [])
    )


async def _respond(
    send: Send, status: int, body: bytes, content_type: bytes = b"application/json", *, retry: bool = False
) -> None:
    headers = [(b"content-type", content_type), (b"content-length", str(len(body)).encode())]
    if retry:
        headers.append((b"retry-after", b"1"))
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body})


async def _lifespan(receive: Receive, send: Send) -> None:
    while True:
        message = await receive()
        if message["type"] == "lifespan.startup":
            await send({"type": "lifespan.startup.complete"})
        elif message["type"] == "lifespan.shutdown":
            await send({"type": "lifespan.shutdown.complete"})
            return


@serve.deployment(name="Front", max_ongoing_requests=4096, ray_actor_options={"num_cpus": 0})
@serve.ingress()
class Front:
    """The ingress deployment: its ASGI app is a :class:`Relay` over the replicas' handle."""

    def __init__(
        self, replicas: DeploymentHandle[Any], hub: DeploymentHandle[Any], max_body_bytes: int
    ) -> None:
        self.relay = Relay(replicas, hub, max_body_bytes)

    def __serve_build_asgi_app__(self) -> Relay:
        return self.relay
