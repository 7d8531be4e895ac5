"""Embed a Batcher in an existing FastAPI app: started and drained by the app's lifespan.

    uvicorn examples.embed_fastapi:app --loop uvloop          # the embedded SmolLM2
    LLM_BATCHER_MODEL=fake uvicorn examples.embed_fastapi:app  # the fake backend
    curl -N 'http://127.0.0.1:8000/generate?prompt=Once%20upon%20a%20time&max_tokens=32'

The batcher lives exactly as long as the app: ``async with Batcher(...)`` in the lifespan starts its
engine thread and, on shutdown, lets running requests finish (up to ``drain_timeout_s``). The one
route streams plain text; a client that disconnects cancels its request (starlette's
``StreamingResponse`` watches for the disconnect, and leaving ``async with`` cancels it).
"""

from __future__ import annotations

import math
import os
from collections.abc import AsyncIterator
from contextlib import AsyncExitStack, asynccontextmanager

from fastapi import FastAPI, HTTPException, Query, Request
from fastapi.responses import StreamingResponse
from prometheus_client import CollectorRegistry

from batcher import BatchConfig, Batcher, BatcherError, InvalidRequest, Overloaded


def _backend() -> object:
    if os.environ.get("LLM_BATCHER_MODEL") == "fake":
        from batcher.testing import FakeBackend

        return FakeBackend(step_time_s=0.02)
    from batcher.adapters import HFBackend

    return HFBackend()


@asynccontextmanager
async def lifespan(app: FastAPI) -> AsyncIterator[None]:
    registry = CollectorRegistry()  # your app's registry: expose it wherever you expose metrics
    config = BatchConfig(max_batch_size=32, max_queue=128, drain_timeout_s=10)
    async with Batcher(_backend(), config=config, registry=registry) as batcher:
        app.state.batcher = batcher
        yield


app = FastAPI(lifespan=lifespan)


@app.get("/generate")
async def generate(
    request: Request, prompt: str, max_tokens: int = Query(64, ge=1, le=1024)
) -> StreamingResponse:
    batcher: Batcher = request.app.state.batcher
    resources = AsyncExitStack()
    try:  # entering the stream admits and tokenizes: refusals become HTTP errors here
        stream = await resources.enter_async_context(batcher.stream(prompt, max_tokens=max_tokens))
    except InvalidRequest as e:
        raise HTTPException(400, str(e)) from e
    except Overloaded as e:
        retry = str(max(1, math.ceil(e.retry_after)))
        raise HTTPException(429, str(e), headers={"Retry-After": retry}) from e
    except BatcherError as e:
        raise HTTPException(503, str(e)) from e

    async def text() -> AsyncIterator[str]:
        async with resources:  # leaving it early (client gone) cancels the request
            async for chunk in stream:
                yield chunk.text

    return StreamingResponse(text(), media_type="text/plain; charset=utf-8")
