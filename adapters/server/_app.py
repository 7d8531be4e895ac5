"""The OpenAI-compatible example server: an ASGI app over one :class:`batcher.Batcher`.

Layout:
    _app             settings, the app factory (routes, error mapping, lifespan), ``serve()``
    _openai          request models and the response/SSE bodies of the OpenAI wire format
    _asgi            the gate middleware (metrics, body limit, drain, auth) and the SSE response

Life of the process: the app listens at once; the model loads in the background (``/ready`` is
503 until it has). On SIGTERM or SIGINT the server drains: ``/ready`` and new ``/v1`` requests get
503, running streams go on until they finish or the drain timeout ends them
(``Batcher.aclose(timeout)``), then uvicorn stops and the process exits 0. A second signal forces
an immediate exit.

Errors map to statuses before a stream starts (entering ``Batcher.stream`` admits and tokenizes):
400 bad input (413 body too large), 401 auth, 429 queue full with ``Retry-After``, 503 draining or
loading, 504 deadline passed, 500 only for a backend failure. After the SSE response started, an
error is sent as one ``data: {"error": ...}`` event, then ``data: [DONE]``.
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
from collections.abc import AsyncIterator, Callable
from contextlib import AsyncExitStack, asynccontextmanager
from dataclasses import dataclass, field
from typing import Any

import uvicorn
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest
from starlette.exceptions import HTTPException
from starlette.responses import JSONResponse, Response

from batcher import (
    BatchConfig,
    Batcher,
    BatcherClosed,
    BatcherError,
    DeadlineExceeded,
    InvalidRequest,
    Overloaded,
    PromptTooLong,
    RequestFailed,
)
from batcher.testing import FakeBackend

from ._asgi import CLIENT_CLOSED, EventStream, Gate, until_disconnect
from ._openai import (
    SSE_DONE,
    ChatRequest,
    CompletionRequest,
    ResponseShape,
    error_body,
    sse_event,
    usage_body,
)

__all__ = ["ServerSettings", "create_app", "make_backend", "serve"]

log = logging.getLogger("llm_batcher.server")


@dataclass(frozen=True, kw_only=True)
class ServerSettings:
    """Everything ``llm-batcher serve`` can be told (flags and ``LLM_BATCHER_*``, see ``_cli``).

    ``model``: ``None`` for the embedded SmolLM2, ``"fake"`` for :class:`batcher.FakeBackend` with
    a realistic step time (``fake_step_s + fake_step_per_seq_s * batch``), else a model path or
    Hugging Face id for ``HFBackend``.
    """

    model: str | None = None
    dtype: str | None = None
    device: str | None = None
    host: str = "127.0.0.1"
    port: int = 8000
    api_key: str | None = None
    batch: BatchConfig = field(default_factory=BatchConfig)
    default_deadline_s: float | None = None
    max_body_bytes: int = 1 << 20
    fake_step_s: float = 0.02
    fake_step_per_seq_s: float = 0.001
    log_level: str = "info"


def make_backend(settings: ServerSettings) -> Any:
    """Build the generation backend the settings name (the HF one imports torch: call off-loop)."""
    if settings.model == "fake":
        return FakeBackend(step_time_s=settings.fake_step_s, step_time_per_seq_s=settings.fake_step_per_seq_s)
    from ..hf import HFBackend

    # model None: the embedded SmolLM2. dtype "auto" and device "cpu" are HFBackend's defaults.
    return HFBackend(settings.model, dtype=settings.dtype or "auto", device=settings.device or "cpu")


class ServerState:
    """The batcher behind the app and where it is in its life: loading, ready, draining, closed."""

    def __init__(
        self,
        settings: ServerSettings,
        registry: CollectorRegistry,
        backend_factory: Callable[[], Any],
    ) -> None:
        self.settings = settings
        self.registry = registry
        self.backend_factory = backend_factory
        self.batcher: Batcher | None = None
        self.model_name = settings.model or "SmolLM2-135M-Instruct"
        self.draining = False
        self.load_error: BaseException | None = None
        #: Called when loading fails (``serve`` stops the process with status 1).
        self.on_fatal: Callable[[], None] = lambda: None
        self._drained: asyncio.Task[None] | None = None

    async def load(self) -> None:
        try:
            backend = await asyncio.to_thread(self.backend_factory)
            batcher = Batcher(backend, config=self.settings.batch, registry=self.registry)
            await batcher.__aenter__()
        except Exception as e:
            log.exception("could not load the model")
            self.load_error = e
            self.on_fatal()
            return
        self.model_name = batcher.model_name
        self.batcher = batcher
        log.info("model %s ready", self.model_name)

    @property
    def ready(self) -> bool:
        return self.batcher is not None and self.batcher.ready and not self.draining

    def require_batcher(self) -> Batcher:
        if self.batcher is None:
            raise BatcherClosed("the model is still loading: retry when GET /ready answers 200")
        return self.batcher

    def drain(self) -> asyncio.Task[None]:
        """Start draining (idempotent); the task ends when every request has ended."""
        self.draining = True
        if self._drained is None:
            self._drained = asyncio.get_running_loop().create_task(self._close())
        return self._drained

    async def _close(self) -> None:
        if self.batcher is not None:
            log.info(
                "draining: waiting up to %.1f s for running requests", self.settings.batch.drain_timeout_s
            )
            await self.batcher.aclose(timeout=self.settings.batch.drain_timeout_s)
            log.info("drained")


def create_app(
    settings: ServerSettings | None = None,
    *,
    registry: CollectorRegistry | None = None,
    backend_factory: Callable[[], Any] | None = None,
) -> Gate:
    """The ASGI app: FastAPI routes inside the :class:`Gate` middleware.

    ``registry`` receives the batcher's metrics and the HTTP request counter (a fresh one by
    default); ``backend_factory`` overrides the backend the settings name (tests).
    """
    settings = settings or ServerSettings()
    registry = registry if registry is not None else CollectorRegistry()
    state = ServerState(settings, registry, backend_factory or (lambda: make_backend(settings)))

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        loading = asyncio.get_running_loop().create_task(state.load())
        try:
            yield
        finally:
            loading.cancel()
            await asyncio.wait([loading])
            await state.drain()

    api = FastAPI(title="llm-batcher", version="0.1.0", lifespan=lifespan)
    api.state.server = state
    _add_routes(api, state)
    _add_error_handlers(api)
    gate = Gate(
        api,
        registry=registry,
        max_body_bytes=settings.max_body_bytes,
        api_key=settings.api_key,
        draining=lambda: state.draining,
    )
    gate.state = state  # type: ignore[attr-defined]
    return gate


# -- routes ------------------------------------------------------------------------------------
def _add_routes(api: FastAPI, state: ServerState) -> None:
    @api.get("/health")
    async def health() -> dict[str, str]:
        """Alive: always 200 while the process serves HTTP."""
        return {"status": "ok"}

    @api.get("/ready", responses={503: {"description": "loading or draining"}})
    async def ready() -> Response:
        """Ready for traffic: the model is loaded and the server is not draining."""
        if state.ready:
            return JSONResponse({"status": "ready", "model": state.model_name})
        why = "draining" if state.draining else "failed" if state.load_error else "loading"
        return JSONResponse({"status": why}, status_code=503)

    @api.get("/metrics")
    async def metrics() -> Response:
        """Prometheus text exposition of the batcher's and the server's metrics."""
        return Response(generate_latest(state.registry), media_type=CONTENT_TYPE_LATEST)

    @api.get("/v1/models")
    async def models() -> dict[str, Any]:
        return {
            "object": "list",
            "data": [
                {
                    "id": state.model_name,
                    "object": "model",
                    "created": 0,
                    "owned_by": "llm-batcher",
                }
            ],
        }

    @api.post("/v1/completions")
    async def completions(body: CompletionRequest, request: Request) -> Response:
        return await _generate(state, request, body.text_prompt(), body, chat=False)

    @api.post("/v1/chat/completions")
    async def chat_completions(body: ChatRequest, request: Request) -> Response:
        return await _generate(state, request, body.chat_prompt(), body, chat=True)


async def _generate(
    state: ServerState,
    request: Request,
    prompt: Any,
    body: CompletionRequest | ChatRequest,
    *,
    chat: bool,
) -> Response:
    options = body.options()
    if state.settings.default_deadline_s is not None:
        options["deadline_s"] = state.settings.default_deadline_s
    batcher = state.require_batcher()
    shape = ResponseShape(chat=chat, model=state.model_name)
    resources = AsyncExitStack()
    try:
        stream = await resources.enter_async_context(batcher.stream(prompt, **options))
    except BaseException:
        await resources.aclose()
        raise
    if body.stream:
        return SSEResponse(_events(stream, shape, body.include_usage), resources)
    async with resources:
        result = await until_disconnect(request.receive, lambda: _collect(stream))
    if result is None:
        return Response(status_code=CLIENT_CLOSED)
    text, reason, usage = result
    return JSONResponse(shape.full(text, reason, usage))


async def _collect(stream: AsyncIterator[Any]) -> tuple[str, str, dict[str, int]]:
    parts: list[str] = []
    reason, usage = "stop", usage_body(0, 0)
    async for chunk in stream:
        parts.append(chunk.text)
        if chunk.finish_reason is not None:
            reason = chunk.finish_reason
        if chunk.usage is not None:
            usage = usage_body(chunk.usage.prompt_tokens, chunk.usage.completion_tokens)
    return "".join(parts), reason, usage


async def _events(
    stream: AsyncIterator[Any], shape: ResponseShape, include_usage: bool
) -> AsyncIterator[bytes]:
    """The SSE body: chunks, then (if asked) a usage chunk, then ``[DONE]``; errors as an event."""
    usage = None
    try:
        if shape.chat:
            yield sse_event(shape.chunk("", role=True))
        async for chunk in stream:
            if chunk.usage is not None:
                usage = chunk.usage
            if chunk.text or chunk.finish_reason is not None:
                yield sse_event(shape.chunk(chunk.text or None, chunk.finish_reason))
        if include_usage and usage is not None:
            yield sse_event(shape.usage_chunk(usage_body(usage.prompt_tokens, usage.completion_tokens)))
    except Exception as e:  # the response has started: the error can only be an event now
        status, body, _ = _error_response(e)
        if isinstance(e, BatcherError):
            log.info("stream ended by %s (%d)", type(e).__name__, status)
        else:
            log.exception("unexpected error in a stream")
        yield sse_event(body)
    yield SSE_DONE


class SSEResponse(EventStream, Response):
    """:class:`EventStream` dressed as a starlette ``Response`` so FastAPI passes it through."""

    def __init__(self, events: AsyncIterator[bytes], resources: AsyncExitStack) -> None:
        EventStream.__init__(self, events, resources)
        self.status_code = 200
        self.background = None


# -- errors ------------------------------------------------------------------------------------
def _error_response(e: BaseException) -> tuple[int, dict[str, Any], dict[str, str]]:
    """Status, OpenAI error body and extra headers for an error of ours."""
    if isinstance(e, PromptTooLong):
        return (
            400,
            error_body(str(e), type="invalid_request_error", param=e.field, code="context_length_exceeded"),
            {},
        )
    if isinstance(e, InvalidRequest):
        return 400, error_body(str(e), type="invalid_request_error", param=e.field), {}
    if isinstance(e, Overloaded):
        retry = str(max(1, math.ceil(e.retry_after))) if math.isfinite(e.retry_after) else "1"
        return 429, error_body(str(e), type="overloaded_error", code="queue_full"), {"retry-after": retry}
    if isinstance(e, BatcherClosed):
        return 503, error_body(str(e), type="service_unavailable", code="unavailable"), {"retry-after": "1"}
    if isinstance(e, DeadlineExceeded):
        return 504, error_body(str(e), type="timeout_error", code="deadline_exceeded"), {}
    if isinstance(e, RequestFailed):
        return (
            500,
            error_body(f"{e} (cause: {e.__cause__!r})", type="server_error", code="backend_failed"),
            {},
        )
    return 500, error_body("internal server error", type="server_error"), {}


def _add_error_handlers(api: FastAPI) -> None:
    @api.exception_handler(BatcherError)
    async def batcher_error(request: Request, e: BatcherError) -> Response:
        status, body, headers = _error_response(e)
        return JSONResponse(body, status_code=status, headers=headers)

    @api.exception_handler(RequestValidationError)
    async def validation_error(request: Request, e: RequestValidationError) -> Response:
        first = e.errors()[0] if e.errors() else {}
        loc = [str(p) for p in first.get("loc", ()) if p != "body"]
        if first.get("type") == "json_invalid":
            message, param = f"malformed JSON body: {first.get('ctx', {}).get('error', '')}", None
        else:
            param = ".".join(loc) or None
            message = f"{param or 'body'}: {first.get('msg', 'invalid value')}"
        body = error_body(message, type="invalid_request_error", param=param, code="invalid_value")
        return JSONResponse(body, status_code=400)

    @api.exception_handler(HTTPException)
    async def http_error(request: Request, e: HTTPException) -> Response:
        body = error_body(
            str(e.detail), type="invalid_request_error", code="not_found" if e.status_code == 404 else None
        )
        return JSONResponse(body, status_code=e.status_code, headers=e.headers)

    @api.exception_handler(Exception)
    async def unexpected(request: Request, e: Exception) -> Response:
        log.exception("unexpected error on %s", request.url.path)
        return JSONResponse(error_body("internal server error", type="server_error"), status_code=500)


# -- running it --------------------------------------------------------------------------------
def serve(settings: ServerSettings) -> int:
    """Run the server until SIGTERM/SIGINT has drained it. Returns the process exit status."""
    app = create_app(settings)
    config = uvicorn.Config(
        app,
        host=settings.host,
        port=settings.port,
        loop="uvloop",
        log_level=settings.log_level,
        timeout_graceful_shutdown=5,
    )
    server = _DrainingServer(config, app.state)  # type: ignore[attr-defined]
    server.run()
    return 1 if app.state.load_error is not None else 0  # type: ignore[attr-defined]


class _DrainingServer(uvicorn.Server):
    """uvicorn's server, but the first SIGTERM/SIGINT drains the batcher before stopping.

    uvicorn would close the listening socket at once (no 503 from /ready, no 503 for new
    requests) and re-raise the signal at exit (status -15). Here the socket stays open while the
    batcher drains, then uvicorn stops normally and the process exits 0.
    """

    def __init__(self, config: Any, state: ServerState) -> None:
        super().__init__(config)
        self.state = state
        self.loop: asyncio.AbstractEventLoop | None = None
        state.on_fatal = self._fatal

    async def startup(self, sockets: Any = None) -> None:
        self.loop = asyncio.get_running_loop()
        await super().startup(sockets=sockets)

    def handle_exit(self, sig: int, frame: Any) -> None:
        if self.state.draining or self.loop is None:
            self.force_exit = self.state.draining
            self.should_exit = True
            return
        log.info("signal %d: draining", sig)
        self.loop.call_soon_threadsafe(self._drain)

    def _drain(self) -> None:
        started = time.monotonic()
        task = self.state.drain()
        task.add_done_callback(lambda _: self._stop(started))

    def _stop(self, started: float) -> None:
        log.info("drain finished in %.2f s: stopping", time.monotonic() - started)
        self.should_exit = True

    def _fatal(self) -> None:
        self.should_exit = True
