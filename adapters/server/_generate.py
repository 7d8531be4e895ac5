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
from collections.abc import AsyncIterator, Awaitable, Sequence
from contextlib import AsyncExitStack
from typing import TYPE_CHECKING, Any, TypeVar

from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from batcher import (
    Batcher,
    BatcherClosed,
    BatcherError,
    Chunk,
    DeadlineExceeded,
    InvalidRequest,
    Overloaded,
    Prompt,
    PromptTooLong,
    RequestFailed,
    Usage,
)
from batcher.backend import Logprobs

from ._asgi import CLIENT_CLOSED, FORCED, EventStream, LiveSet, request_context, until_disconnect
from ._auth import DEFAULT_TENANT
from ._openai import (
    SSE_DONE,
    ChatRequest,
    Choice,
    CompletionRequest,
    ResponseShape,
    error_body,
    sse_event,
    token_text,
    usage_body,
)

if TYPE_CHECKING:
    from ._app import ServerState

__all__ = ["error_response", "generate"]

log = logging.getLogger("llm_batcher.server")
T = TypeVar("T")


async def generate(
    state: ServerState,
    request: Request,
    prompts: list[Prompt],
    body: CompletionRequest | ChatRequest,
    *,
    chat: bool,
) -> Response:
    """Check the options and the prompts' sizes, admit ``n`` batcher requests per prompt (all or
    none: a refusal closes the ones admitted), then answer with JSON or server-sent events."""
    options = body.options(state.settings.batch.max_tokens_limit)
    n = body.choices(len(prompts))
    if state.settings.default_deadline_s is not None:
        options["deadline_s"] = state.settings.default_deadline_s
    for prompt in prompts:
        state.size.check(prompt)
    batcher = state.require_batcher()
    ctx = request_context(request.scope)
    # fair queuing: the API key's tenant, else the OpenAI `user` field, else the shared tenant
    options["tenant"] = ctx.tenant if ctx.tenant != DEFAULT_TENANT else (body.user or DEFAULT_TENANT)[:256]
    ctx.admitted = True  # from here the batcher counts refusals
    tools = isinstance(body, ChatRequest) and body.calls_tool
    shape = ResponseShape(chat=chat, model=state.model_name, logprobs="logprobs" in options, tools=tools)
    resources = AsyncExitStack()
    try:
        streams = await _admit(resources, batcher, prompts, options, n)
    except BaseException:
        await resources.aclose()
        raise
    if body.stream:
        events = _events(streams, shape, body.include_usage, n)
        return SSEResponse(events, resources, state.live, abort_events())
    async with resources:
        results = await until_disconnect(request.receive, lambda: _collect_all(streams), state.live)
    if results is None:
        return Response(status_code=CLIENT_CLOSED)
    usage = _sum_usage([u for _, u in results], n)
    return JSONResponse(shape.full([choice for choice, _ in results], usage))


async def _admit(
    resources: AsyncExitStack, batcher: Batcher, prompts: list[Prompt], options: dict[str, Any], n: int
) -> list[AsyncIterator[Chunk]]:
    """Admit ``n`` streams per prompt, choice ``i * n + j`` being copy ``j`` of prompt ``i``.

    With ``n > 1``, the first copies go first and the others only once the first copy's first
    token arrived: its prompt is then in the backend's prefix cache, which serves the copies'
    prompts (admitted together, each would prefill the whole prompt). Each copy of a seeded
    request gets its own seed, derived from the request's (:func:`choice_seed`)."""
    firsts = [batcher.stream(p, **options) for p in prompts]
    for s in firsts:
        await resources.enter_async_context(s)
    if n == 1:
        return list(firsts)
    heads = await _all([anext(s) for s in firsts])
    streams: list[AsyncIterator[Chunk]] = []
    for prompt, first, head in zip(prompts, firsts, heads, strict=True):
        streams.append(_prepend(head, first))
        for j in range(1, n):
            copy = dict(options)
            if "seed" in copy:
                copy["seed"] = choice_seed(copy["seed"], j)
            s = batcher.stream(prompt, **copy)
            await resources.enter_async_context(s)
            streams.append(s)
    return streams


def choice_seed(seed: int, j: int) -> int:
    """The seed of choice ``j`` of a request seeded ``seed``: ``seed`` itself for the first, then
    distinct values (an odd multiplier is invertible modulo 2**63), the same on every run."""
    return (seed + j * 0x9E3779B97F4A7C15) % (1 << 63)


async def _prepend(head: Chunk, rest: AsyncIterator[Chunk]) -> AsyncIterator[Chunk]:
    yield head
    if head.finish_reason is None:
        async for chunk in rest:
            yield chunk


async def _collect(stream: AsyncIterator[Chunk]) -> tuple[Choice, Usage | None]:
    parts: list[str] = []
    logprobs: list[Logprobs] = []
    reason, usage = "stop", None
    async for chunk in stream:
        parts.append(chunk.text)
        logprobs += chunk.logprobs
        if chunk.finish_reason is not None:
            reason = chunk.finish_reason
        if chunk.usage is not None:
            usage = chunk.usage
    return Choice("".join(parts), reason, logprobs), usage


async def _collect_all(streams: list[AsyncIterator[Chunk]]) -> list[tuple[Choice, Usage | None]]:
    """Every stream's result (see :func:`_all`)."""
    return await _all([_collect(s) for s in streams])


async def _all(awaitables: list[Awaitable[T]]) -> list[T]:
    """Every result; if one fails or this is cancelled, the others are cancelled and awaited
    before the error propagates (so the streams they read can be closed afterwards)."""
    tasks = [asyncio.ensure_future(a) for a in awaitables]
    try:
        return await asyncio.gather(*tasks)
    except BaseException:
        for task in tasks:
            task.cancel()
        await asyncio.wait(tasks)
        raise


def _sum_usage(usages: Sequence[Usage | None], n: int) -> dict[str, int]:
    """OpenAI's usage of ``n`` choices per prompt: each prompt counted once, every completion."""
    prompt = sum(u.prompt_tokens for u in usages[::n] if u is not None)
    return usage_body(prompt, sum(u.completion_tokens for u in usages if u is not None))


async def _merged(streams: list[AsyncIterator[Chunk]]) -> AsyncIterator[tuple[int, Chunk]]:
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
    streams: list[AsyncIterator[Chunk]], shape: ResponseShape, include_usage: bool, n: int
) -> AsyncIterator[bytes]:
    """The SSE body: chunks, then (if asked) a usage chunk, then ``[DONE]``; errors as an event."""
    usages: list[Usage | None] = [None] * len(streams)
    offsets = [0] * len(streams)  # characters of token text sent per choice (legacy text_offset)
    calls = [""] * len(streams)  # a tool call's text so far (sent whole, once complete)
    try:
        if shape.chat:
            for i in range(len(streams)):
                yield sse_event(shape.chunk("", role=True, index=i))
        async for i, chunk in _merged(streams):
            if chunk.usage is not None:
                usages[i] = chunk.usage
            if shape.tools:
                calls[i] += chunk.text
                if chunk.finish_reason is not None:
                    for body in shape.tool_chunks(calls[i], chunk.finish_reason, index=i):
                        yield sse_event(body)
            elif chunk.text or chunk.finish_reason is not None or chunk.logprobs:
                text = chunk.text or None
                yield sse_event(
                    shape.chunk(
                        text, chunk.finish_reason, index=i, logprobs=chunk.logprobs, offset=offsets[i]
                    )
                )
                offsets[i] += sum(len(token_text(e.chosen.token_bytes)) for e in chunk.logprobs)
        if include_usage:
            yield sse_event(shape.usage_chunk(_sum_usage(usages, n)))
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
