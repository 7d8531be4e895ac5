"""Connection hygiene below the ASGI app: uvicorn's h11 protocol with deadlines and a cap.

uvicorn (0.54, h11) has a keep-alive timeout but no deadline for a request's headers or body, and
no cap on connections, so silent or slow-loris clients hold their sockets forever and, past the
process's file limit, lock everyone out (``/health`` included). :func:`guarded_protocol` returns a
protocol class that adds, per connection:

* a **header deadline**: from the connection's start (or the end of its previous response) to a
  complete request head; missed, the connection is closed;
* a **body deadline**: from the head to the end of the body; missed, the connection is closed (the
  app sees ``http.disconnect``);
* a **cap** on open connections, shared by the server: a newcomer at the cap sheds the oldest
  connection that has no request in flight (idle keep-alive, or headers still incomplete); if
  every connection is busy, the newcomer gets a JSON 503 and is closed.

It also answers a request h11 cannot parse (a malformed ``Content-Length``, a bad request line)
with a JSON 400 in OpenAI's error shape instead of uvicorn's plain text. A closed connection gets
no response at all: there is nobody to send it to.
"""

from __future__ import annotations

import asyncio
import json
import logging
import resource
from dataclasses import dataclass
from typing import Any, ClassVar

import h11
from uvicorn.protocols.http.h11_impl import H11Protocol

from batcher import InvalidRequest

from ._openai import error_body

__all__ = ["ConnectionLimits", "guarded_protocol"]

log = logging.getLogger("llm_batcher.server")

#: File descriptors kept free of connections (model files, pipes, the listening socket, logs).
FD_RESERVE = 64


@dataclass(frozen=True, slots=True, kw_only=True)
class ConnectionLimits:
    """Deadlines (seconds) and the connection cap; see the module doc."""

    header_timeout_s: float = 10.0
    body_timeout_s: float = 30.0
    keep_alive_s: float = 5.0
    max_connections: int = 1024

    def __post_init__(self) -> None:
        for name in ("header_timeout_s", "body_timeout_s", "keep_alive_s"):
            value = getattr(self, name)
            if not 0 < value < 86400:
                raise InvalidRequest(f"{name} must be in (0, 86400) seconds, got {value}", field=name)
        if self.max_connections < 1:
            raise InvalidRequest(
                f"max_connections must be >= 1, got {self.max_connections}", field="max_connections"
            )

    def usable_connections(self) -> int:
        """``max_connections``, lowered to fit the process's file limit (raised to its hard limit
        first) with :data:`FD_RESERVE` descriptors to spare."""
        soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
        if soft != resource.RLIM_INFINITY and (hard == resource.RLIM_INFINITY or soft < hard):
            try:
                resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
                soft = hard
            except (ValueError, OSError):
                pass
        if soft == resource.RLIM_INFINITY:
            return self.max_connections
        usable = max(1, min(self.max_connections, soft - FD_RESERVE))
        if usable < self.max_connections:
            log.warning(
                "max connections lowered from %d to %d: the file limit is %d (raise it with ulimit -n)",
                self.max_connections,
                usable,
                soft,
            )
        return usable


class _Registry:
    """The open connections of one server, oldest first, and the cap."""

    def __init__(self, limits: ConnectionLimits, cap: int) -> None:
        self.limits = limits
        self.cap = cap
        self.open: dict[GuardedProtocol, None] = {}
        self.shed = 0

    def admit(self, conn: GuardedProtocol) -> bool:
        """Make room for ``conn`` (shedding the oldest idle connection) or say there is none."""
        if len(self.open) >= self.cap:
            victim = next((c for c in self.open if c.idle), None)
            if victim is None:
                return False
            self.shed += 1
            victim.close()
        self.open[conn] = None
        return True


class GuardedProtocol(H11Protocol):
    """uvicorn's h11 protocol with deadlines, a shared cap and JSON 400s (see module doc)."""

    registry: ClassVar[_Registry]

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._deadline: asyncio.TimerHandle | None = None
        self._cycle_seen: object = None

    @property
    def idle(self) -> bool:
        """No request in flight: waiting for (the rest of) a request head."""
        return self.cycle is None or self.cycle.response_complete

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        if not self.registry.admit(self):
            _refuse(transport)
            return
        self._arm(self.registry.limits.header_timeout_s)

    def connection_lost(self, exc: Exception | None) -> None:
        self._disarm()
        self.registry.open.pop(self, None)
        super().connection_lost(exc)

    def data_received(self, data: bytes) -> None:
        super().data_received(data)
        self._rearm()

    def on_response_complete(self) -> None:
        super().on_response_complete()  # may start a pipelined request
        self._rearm()

    def _rearm(self) -> None:
        """The deadline that applies now: the head's while idle, the body's from a new request
        head to its end, none while the app answers."""
        cycle = self.cycle
        if self.transport.is_closing():
            self._disarm()
        elif cycle is None or cycle.response_complete:
            if self._cycle_seen is not cycle or self._deadline is None:
                self._cycle_seen = cycle
                self._arm(self.registry.limits.header_timeout_s)
        elif cycle is not self._cycle_seen:
            self._cycle_seen = cycle
            if cycle.more_body:
                self._arm(self.registry.limits.body_timeout_s)
            else:
                self._disarm()
        elif not cycle.more_body:
            self._disarm()

    def send_400_response(self, msg: str) -> None:
        body = json.dumps(
            error_body(
                "malformed HTTP request (request line, a header, or Content-Length): fix the client",
                type="invalid_request_error",
                code="bad_http_request",
            )
        ).encode()
        headers = [
            (b"content-type", b"application/json"),
            (b"content-length", str(len(body)).encode()),
            (b"connection", b"close"),
        ]
        for event in (
            h11.Response(status_code=400, headers=headers),
            h11.Data(data=body),
            h11.EndOfMessage(),
        ):
            self.transport.write(self.conn.send(event))
        self.transport.close()

    def close(self) -> None:
        """Close now (a deadline passed, or the cap shed this connection)."""
        self._disarm()
        self.registry.open.pop(self, None)
        if not self.transport.is_closing():
            self.transport.close()

    def _arm(self, seconds: float) -> None:
        self._disarm()
        self._deadline = self.loop.call_later(seconds, self.close)

    def _disarm(self) -> None:
        if self._deadline is not None:
            self._deadline.cancel()
            self._deadline = None


def _refuse(transport: asyncio.Transport) -> None:
    body = json.dumps(
        error_body(
            "too many open connections, all busy: retry shortly",
            type="service_unavailable",
            code="too_many_connections",
        )
    ).encode()
    head = (
        b"HTTP/1.1 503 Service Unavailable\r\ncontent-type: application/json\r\n"
        b"connection: close\r\nretry-after: 1\r\ncontent-length: " + str(len(body)).encode() + b"\r\n\r\n"
    )
    transport.write(head + body)
    transport.close()


def guarded_protocol(limits: ConnectionLimits) -> type[GuardedProtocol]:
    """A protocol class for ``uvicorn.Config(http=...)`` sharing one registry (one per server)."""
    registry = _Registry(limits, limits.usable_connections())
    return type("GuardedProtocol", (GuardedProtocol,), {"registry": registry})
