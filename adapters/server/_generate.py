"""Serving one generation request: its batcher streams, the JSON or SSE body, error mapping.

A completions request with a list of prompts is one batcher request per prompt: their results are
gathered (non-streaming) or their chunks interleaved as they come, tagged with the choice index
(streaming). Errors map to statuses before a stream starts (entering ``Batcher.stream`` admits and
tokenizes); after the SSE response started, an error is one ``data: {"error": ...}`` event, then
``data: [DONE]``.
"""

from __future__ import annotations

import asyncio
import logging
import math
from collections.abc import AsyncIterator, Iterable
from contextlib import AsyncExitStack
from typing import TYPE_CHECKING, Any

from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from batcher import (
    BatcherClosed,
    BatcherError,
    Chunk,
    DeadlineExceeded,
    InvalidRequest,
    Overloaded,
    Prompt,
    PromptTooLong,
    RequestFailed,
    TokenStream,
    Usage,
)

from ._asgi import CLIENT_CLOSED, FORCED, EventStream, LiveSet, request_context, until_disconnect
from ._auth import DEFAULT_TENANT
from ._openai import (
    SSE_DONE,
    ChatRequest,
    CompletionRequest,
    ResponseShape,
    error_body,
    sse_event,
    usage_body,
)

if TYPE_CHECKING:
    from ._app import ServerState

__all__ = ["error_response", "generate"]

log = logging.getLogger("llm_batcher.server")


async def generate(
    state: ServerState,
    request: Request,
    prompts: list[Prompt],
    body: CompletionRequest | ChatRequest,
    *,
    chat: bool,
) -> Response:
    """Check the options and the prompts' sizes, admit one batcher request per prompt (all or
    none: a refusal closes the ones admitted), then answer with JSON or server-sent events."""
    options = body.options(state.settings.batch.max_tokens_limit)
    if state.settings.default_deadline_s is not None:
        options["deadline_s"] = state.settings.default_deadline_s
    for prompt in prompts:
        state.size.check(prompt)
    batcher = state.require_batcher()
    ctx = request_context(request.scope)
    # fair queuing: the API key's tenant, else the OpenAI `user` field, else the shared tenant
    options["tenant"] = ctx.tenant if ctx.tenant != DEFAULT_TENANT else (body.user or DEFAULT_TENANT)[:256]
    ctx.admitted = True  # from here the batcher counts refusals
    shape = ResponseShape(chat=chat, model=state.model_name)
    resources = AsyncExitStack()
    try:
        streams = [batcher.stream(p, **options) for p in prompts]
        for s in streams:
            await resources.enter_async_context(s)
    except BaseException:
        await resources.aclose()
        raise
    if body.stream:
        events = _events(streams, shape, body.include_usage)
        return SSEResponse(events, resources, state.live, abort_events())
    async with resources:
        results = await until_disconnect(request.receive, lambda: _collect_all(streams), state.live)
    if results is None:
        return Response(status_code=CLIENT_CLOSED)
    usage = _sum_usage(u for _, _, u in results)
    return JSONResponse(shape.full([(text, reason) for text, reason, _ in results], usage))


async def _collect(stream: AsyncIterator[Chunk]) -> tuple[str, str, Usage | None]:
    parts: list[str] = []
    reason, usage = "stop", None
    async for chunk in stream:
        parts.append(chunk.text)
        if chunk.finish_reason is not None:
            reason = chunk.finish_reason
        if chunk.usage is not None:
            usage = chunk.usage
    return "".join(parts), reason, usage


async def _collect_all(streams: list[TokenStream]) -> list[tuple[str, str, Usage | None]]:
    """Every stream's result; if one fails or this is cancelled, the others are cancelled and
    awaited before the error propagates (so the streams can be closed afterwards)."""
    tasks = [asyncio.ensure_future(_collect(s)) for s in streams]
    try:
        return await asyncio.gather(*tasks)
    except BaseException:
        for task in tasks:
            task.cancel()
        await asyncio.wait(tasks)
        raise


def _sum_usage(usages: Iterable[Usage | None]) -> dict[str, int]:
    got = [u for u in usages if u is not None]
    return usage_body(sum(u.prompt_tokens for u in got), sum(u.completion_tokens for u in got))


async def _merged(streams: list[TokenStream]) -> AsyncIterator[tuple[int, Chunk]]:
    """The chunks of several streams as they come, tagged with the stream's index."""
    if len(streams) == 1:
        async for chunk in streams[0]:
            yield 0, chunk
        return
    pending = {asyncio.ensure_future(anext(s)): i for i, s in enumerate(streams)}
    try:
        while pending:
            done, _ = await asyncio.wait(pending, return_when=asyncio.FIRST_COMPLETED)
            for task in sorted(done, key=pending.__getitem__):
                i = pending.pop(task)
                try:
                    chunk = task.result()
                except StopAsyncIteration:
                    continue
                pending[asyncio.ensure_future(anext(streams[i]))] = i
                yield i, chunk
    finally:
        for task in pending:
            task.cancel()
        if pending:
            await asyncio.wait(pending)


async def _events(
    streams: list[TokenStream], shape: ResponseShape, include_usage: bool
) -> AsyncIterator[bytes]:
    """The SSE body: chunks, then (if asked) a usage chunk, then ``[DONE]``; errors as an event."""
    usages: list[Usage | None] = [None] * len(streams)
    try:
        if shape.chat:
            yield sse_event(shape.chunk("", role=True))
        async for i, chunk in _merged(streams):
            if chunk.usage is not None:
                usages[i] = chunk.usage
            if chunk.text or chunk.finish_reason is not None:
                yield sse_event(shape.chunk(chunk.text or None, chunk.finish_reason, index=i))
        if include_usage:
            yield sse_event(shape.usage_chunk(_sum_usage(usages)))
    except Exception as e:  # the response has started: the error can only be an event now
        status, body, _ = error_response(e)
        if isinstance(e, BatcherError):
            log.info("stream ended by %s (%d)", type(e).__name__, status)
        else:
            log.exception("unexpected error in a stream")
        yield sse_event(body)
    yield SSE_DONE


def abort_events() -> bytes:
    """What a stream still gets when a second signal ends it: an error event, then ``[DONE]``."""
    _, body, _ = error_response(BatcherClosed(FORCED))
    return sse_event(body) + SSE_DONE


class SSEResponse(EventStream, Response):
    """:class:`EventStream` dressed as a starlette ``Response`` so FastAPI passes it through."""

    def __init__(
        self, events: AsyncIterator[bytes], resources: AsyncExitStack, live: LiveSet, on_abort: bytes
    ) -> None:
        EventStream.__init__(self, events, resources, live=live, on_abort=on_abort)
        self.status_code = 200
        self.background = None


def retry_headers(seconds: float) -> dict[str, str]:
    """``Retry-After`` (whole seconds, as HTTP defines it, at least 1) and OpenAI's
    ``retry-after-ms`` (the jittered estimate itself: the official clients read it first, so
    refused clients spread out below a second too)."""
    if not math.isfinite(seconds) or seconds <= 0:
        seconds = 1.0
    return {
        "retry-after": str(max(1, math.ceil(seconds))),
        "retry-after-ms": str(max(1, round(seconds * 1000))),
    }


def error_response(e: BaseException) -> tuple[int, dict[str, Any], dict[str, str]]:
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
        return (
            429,
            error_body(str(e), type="overloaded_error", code="queue_full"),
            retry_headers(e.retry_after),
        )
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
