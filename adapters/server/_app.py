"""The OpenAI-compatible example server: an ASGI app over one :class:`batcher.Batcher`.

Layout (reference: ``docs/server.md``):
    _app             settings, the app factory (routes, error mapping, lifespan), ``serve()``
    _generate        one generation request: batcher streams, JSON or SSE body, status mapping
    _fields          the one table of request fields: supported, ignored, refused
    _openai          request models and the response/SSE bodies of the OpenAI wire format
    _limits          refusing a prompt by size before tokenizing; the derived body limit
    _auth            API keys, their tenants and weights
    _asgi            the gate middleware (metrics, body limit, availability, auth) and the SSE response
    _protocol        uvicorn's h11 protocol with head/body deadlines, a connection cap, JSON 400s

Life of the process: the app listens at once; the model loads in the background (``/ready`` is
503 until it has, with a log line before and after; the GGUF conversion and the weights show
transformers' progress bars). On SIGTERM or SIGINT the server drains: ``/ready`` and new ``/v1``
requests get 503, running streams go on until they finish or the drain timeout ends them
(``Batcher.aclose(timeout)``), then uvicorn stops and the process exits 0. A second signal ends
every open response with an error (see :class:`_DrainingServer`) and exits 1.

Statuses: 400 bad input, 404 unknown model, 413 body too large, 401 auth, 429 queue full with
``Retry-After``, 503 draining or loading, 504 deadline passed, 500 only for a backend failure
(``_generate.error_response``).
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import uvicorn
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest
from starlette.exceptions import HTTPException
from starlette.responses import JSONResponse, Response

from batcher import BatchConfig, Batcher, BatcherClosed, BatcherError, __version__
from batcher.testing import FakeBackend

from ._asgi import (
    DOCS_PATHS,
    Gate,
    LiveSet,
    WithServerRejections,
)
from ._auth import ApiKey, KeyRing
from ._generate import error_response, generate
from ._limits import PromptLimits
from ._openai import (
    ChatRequest,
    CompletionRequest,
    error_body,
)
from ._protocol import ConnectionLimits, guarded_protocol

__all__ = ["ServerSettings", "create_app", "make_backend", "serve"]

log = logging.getLogger("llm_batcher.server")
#: After a second signal: how long the open responses get to send their error and end.
FORCED_GRACE_S = 1.0


@dataclass(frozen=True, kw_only=True)
class ServerSettings:
    """Everything ``llm-batcher serve`` can be told (flags and ``LLM_BATCHER_*``, see ``_cli``).

    ``model``: ``None`` for the embedded SmolLM2, ``"fake"`` for :class:`batcher.testing.FakeBackend` with
    a realistic step time (``fake_step_s + fake_step_per_seq_s * batch``), else a model path or
    Hugging Face id for ``HFBackend``. ``served_model_names``: the id clients send (the first is
    canonical, the rest aliases; default: the model's own name). ``api_keys``: who may call
    ``/v1/*`` and as which tenant (none: no auth). ``max_prompt_chars`` / ``max_body_bytes``:
    ``None`` derives them from the model's context (see ``_limits``). ``docs``: serve ``/docs``,
    ``/redoc`` and ``/openapi.json`` (behind the key when there is one). ``allow_special_tokens``:
    parse special-token text in user content as control tokens (trusted callers only).
    """

    model: str | None = None
    served_model_names: tuple[str, ...] = ()
    dtype: str | None = None
    device: str | None = None
    host: str = "127.0.0.1"
    port: int = 8000
    api_keys: tuple[ApiKey, ...] = ()
    batch: BatchConfig = field(default_factory=BatchConfig)
    default_deadline_s: float | None = None
    max_prompt_chars: int | None = None
    max_body_bytes: int | None = None
    limits: ConnectionLimits = field(default_factory=ConnectionLimits)
    docs: bool = False
    allow_special_tokens: bool = False
    fake_step_s: float = 0.02
    fake_step_per_seq_s: float = 0.001
    log_level: str = "info"


def make_backend(settings: ServerSettings) -> Any:
    """Build the generation backend the settings name (the HF one imports torch: call off-loop)."""
    if settings.model == "fake":
        return FakeBackend(step_time_s=settings.fake_step_s, step_time_per_seq_s=settings.fake_step_per_seq_s)
    from ..hf import HFBackend

    model, name = settings.model, None
    if model is None:
        from ..hf._load import EMBEDDED_NAME, embedded_model_dir

        log.info("preparing the embedded SmolLM2 (its first use converts the GGUF once: about 30 s)")
        started = time.monotonic()
        model, name = str(embedded_model_dir()), EMBEDDED_NAME
        log.info("embedded model ready at %s (%.1f s)", model, time.monotonic() - started)
    # dtype "auto" and device "cpu" are HFBackend's defaults.
    return HFBackend(
        model,
        dtype=settings.dtype or "auto",
        device=settings.device or "cpu",
        model_name=name,
        allow_special_tokens=settings.allow_special_tokens,
    )


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
        self.names = settings.served_model_names or (_default_name(settings),)
        self.size = PromptLimits.before_load(settings)
        self.draining = False
        self.load_error: BaseException | None = None
        #: The requests whose response can still be ended with an error (second signal).
        self.live = LiveSet()
        #: Called when loading fails (``serve`` stops the process with status 1).
        self.on_fatal: Callable[[], None] = lambda: None
        self._drained: asyncio.Task[None] | None = None

    @property
    def model_name(self) -> str:
        """The canonical model id (the first served name)."""
        return self.names[0]

    def knows(self, model: str | None) -> bool:
        """Whether ``model`` names this server's model (unset means the canonical one)."""
        return model is None or model in self.names

    async def load(self) -> None:
        what = self.settings.model or "the embedded SmolLM2"
        log.info("loading %s (tokenizer, weights, warm-up)...", what)
        started = time.monotonic()
        try:
            backend = await asyncio.to_thread(self.backend_factory)
            size = await asyncio.to_thread(PromptLimits.for_backend, backend, self.settings)
            name = self.settings.served_model_names[0] if self.settings.served_model_names else None
            weights = {k.tenant: k.weight for k in self.settings.api_keys}  # each key's tenant's share
            config = replace(
                self.settings.batch, tenant_weights={**weights, **self.settings.batch.tenant_weights}
            )
            batcher = Batcher(backend, config=config, registry=self.registry, model_name=name)
            await batcher.__aenter__()
        except Exception as e:
            log.error("could not load the model %s: %s", what, _one_line(e))
            log.debug("the load failed with", exc_info=e)
            self.load_error = e
            self.on_fatal()
            return
        if not self.settings.served_model_names:
            self.names = (batcher.model_name,)
        self.size = size
        self.batcher = batcher
        log.info(
            "model %s ready in %.1f s (prompts up to %d characters, bodies up to %d bytes)",
            self.model_name,
            time.monotonic() - started,
            self.size.max_prompt_chars,
            self.size.max_body_bytes,
        )

    @property
    def ready(self) -> bool:
        return self.batcher is not None and self.batcher.ready and not self.draining

    def unavailable(self) -> str | None:
        """Why ``/v1/*`` is refused now (draining, loading), or None."""
        if self.draining:
            return "draining"
        if self.batcher is None:
            return "loading"
        return None

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


def _default_name(settings: ServerSettings) -> str:
    if settings.model is None:
        return "SmolLM2-135M-Instruct"
    path = Path(settings.model)
    return path.stem if path.suffix == ".gguf" else path.name if path.is_dir() else settings.model


def _one_line(e: BaseException) -> str:
    text = " ".join(str(e).split()) or type(e).__name__
    return text if len(text) <= 300 else text[:297] + "..."


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

    docs = {} if settings.docs else {"docs_url": None, "redoc_url": None, "openapi_url": None}
    api = FastAPI(title="llm-batcher", version=__version__, lifespan=lifespan, **docs)  # type: ignore[arg-type]
    api.state.server = state
    gate = Gate(
        api,
        registry=registry,
        max_body_bytes=lambda: state.size.max_body_bytes,
        keys=KeyRing(settings.api_keys),
        unavailable=state.unavailable,
        protected=DOCS_PATHS if settings.docs else frozenset(),
    )
    _add_routes(api, state, gate)
    _add_error_handlers(api)
    gate.state = state  # type: ignore[attr-defined]
    return gate


# -- routes ------------------------------------------------------------------------------------
def _add_routes(api: FastAPI, state: ServerState, gate: Gate) -> None:
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
        merged = WithServerRejections(state.registry, gate, state.model_name)
        return Response(generate_latest(merged), media_type=CONTENT_TYPE_LATEST)

    @api.get("/v1/models")
    async def models() -> dict[str, Any]:
        """The served model: its canonical id, then its aliases."""
        return {"object": "list", "data": [_model_object(name) for name in state.names]}

    @api.get("/v1/models/{model_id:path}", responses={404: {"description": "unknown model"}})
    async def model(model_id: str) -> Response:
        """One model by id (canonical or alias)."""
        if model_id not in state.names:
            return _model_not_found(model_id)
        return JSONResponse(_model_object(model_id))

    @api.post("/v1/completions")
    async def completions(body: CompletionRequest, request: Request) -> Response:
        if not state.knows(body.model):
            return _model_not_found(body.model)
        return await generate(state, request, list(body.prompts()), body, chat=False)

    @api.post("/v1/chat/completions")
    async def chat_completions(body: ChatRequest, request: Request) -> Response:
        if not state.knows(body.model):
            return _model_not_found(body.model)
        return await generate(state, request, [body.chat_prompt()], body, chat=True)


def _model_object(name: str) -> dict[str, Any]:
    return {"id": name, "object": "model", "created": 0, "owned_by": "llm-batcher"}


def _model_not_found(name: str | None) -> Response:
    message = f"the model {name!r} does not exist here: GET /v1/models lists the served names"
    body = error_body(message, type="invalid_request_error", param="model", code="model_not_found")
    return JSONResponse(body, status_code=404)


def _add_error_handlers(api: FastAPI) -> None:
    @api.exception_handler(BatcherError)
    async def batcher_error(request: Request, e: BatcherError) -> Response:
        status, body, headers = error_response(e)
        return JSONResponse(body, status_code=status, headers=headers)

    @api.exception_handler(RequestValidationError)
    async def validation_error(request: Request, e: RequestValidationError) -> Response:
        first = e.errors()[0] if e.errors() else {}
        loc = [str(p) for p in first.get("loc", ()) if p != "body"]
        cause = first.get("ctx", {}).get("error")
        if isinstance(cause, BatcherError):  # raised by a request model's validator
            return await batcher_error(request, cause)
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
    """Run the server until SIGTERM/SIGINT has drained it. Returns the process exit status: 0
    after a drain, 1 if the model failed to load or a second signal cut requests short."""
    app = create_app(settings)
    config = uvicorn.Config(
        app,
        host=settings.host,
        port=settings.port,
        loop="uvloop",
        http=guarded_protocol(settings.limits),
        log_level=settings.log_level,
        timeout_keep_alive=max(1, math.ceil(settings.limits.keep_alive_s)),
        timeout_graceful_shutdown=5,
    )
    server = _DrainingServer(config, app.state)  # type: ignore[attr-defined]
    server.run()
    return 1 if app.state.load_error is not None or server.forced else 0  # type: ignore[attr-defined]


class _DrainingServer(uvicorn.Server):
    """uvicorn's server, but the first SIGTERM/SIGINT drains the batcher before stopping.

    uvicorn would close the listening socket at once (no 503 from /ready, no 503 for new
    requests) and re-raise the signal at exit (status -15). Here the socket stays open while the
    batcher drains, then uvicorn stops normally and the process exits 0. A second signal ends
    every open response with an error (an SSE error event and ``[DONE]``, or a 503), waits for
    them at most :data:`FORCED_GRACE_S`, stops, and exits 1.
    """

    def __init__(self, config: Any, state: ServerState) -> None:
        super().__init__(config)
        self.state = state
        self.loop: asyncio.AbstractEventLoop | None = None
        self.forced = False
        state.on_fatal = self._fatal

    async def startup(self, sockets: Any = None) -> None:
        self.loop = asyncio.get_running_loop()
        await super().startup(sockets=sockets)

    def handle_exit(self, sig: int, frame: Any) -> None:
        if self.loop is None:
            self.should_exit = True
            return
        if self.state.draining:
            log.warning("signal %d again: ending %d open responses, then exiting", sig, len(self.state.live))
            self.loop.call_soon_threadsafe(self._force)
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

    def _force(self) -> None:
        if self.forced:
            return
        self.forced = True
        self.state.live.abort_all()
        asyncio.get_running_loop().create_task(self._exit_after_abort())

    async def _exit_after_abort(self) -> None:
        # With every response ended, the drain finishes at once and uvicorn stops normally
        # (lifespan included); whatever still holds it after another grace period is cut.
        await self.state.live.wait_empty(FORCED_GRACE_S)
        self.should_exit = True
        asyncio.get_running_loop().call_later(FORCED_GRACE_S, self._cut)

    def _cut(self) -> None:
        self.force_exit = True

    def _fatal(self) -> None:
        self.should_exit = True
