"""Disconnect → cancel, queue full → 429, auth, and SIGTERM → drain → exit 0 (real processes)."""

from __future__ import annotations

import asyncio
import json
import math
import signal
from collections.abc import Callable
from typing import Any

import httpx
import openai
import pytest

from .conftest import Server, expected_text, metric, wait_for

Factory = Callable[..., Server]
FAKE = ("--model", "fake")


async def scrape(http: httpx.AsyncClient, name: str, **labels: str) -> float:
    return metric((await http.get("/metrics")).text, name, **labels)


async def first_event(lines: Any) -> dict[str, Any]:
    async for line in lines:
        if line.startswith("data: "):
            return json.loads(line[6:])  # type: ignore[no-any-return]
    raise AssertionError("stream ended before its first event")


@pytest.mark.slow
async def test_disconnect_cancels_the_request_and_the_batch_shrinks(
    server_factory: Factory,
) -> None:
    # 0.5 s steps: a cancellation counted well within one step was seen via http.disconnect,
    # not at the next write.
    server = server_factory(*FAKE, "--fake-step", "0.5", "--fake-step-per-seq", "0")
    body = {"prompt": "a long story", "max_tokens": 10, "stream": True}
    async with (
        httpx.AsyncClient(base_url=server.url, timeout=30) as http,
        httpx.AsyncClient(base_url=server.url, timeout=30) as leaver,
    ):
        async with http.stream("POST", "/v1/completions", json=body) as stay:
            stay_lines = stay.aiter_lines()
            async with leaver.stream("POST", "/v1/completions", json=body) as leave:
                await first_event(leave.aiter_lines())
                await wait_for(lambda: _running_is(http, 2), 5, "both requests running")
            # leaving the block closed the connection mid-stream
            took = await wait_for(lambda: _cancelled_is(http, 1), 2, "the cancelled outcome in /metrics")
            assert took < 0.4, f"disconnect noticed after {took:.2f} s, not promptly"
            await wait_for(lambda: _running_is(http, 1), 2, "the batch to shrink to 1")
            # the other stream is unaffected and completes
            rest = [line async for line in stay_lines if line.startswith("data: ")]
            assert rest[-1] == "data: [DONE]"
        sizes = (await http.get("/metrics")).text
        assert metric(sizes, "batcher_requests_total", outcome="finished") == 1


async def _running_is(http: httpx.AsyncClient, n: int) -> bool:
    return await scrape(http, "batcher_running_requests") == n


async def _cancelled_is(http: httpx.AsyncClient, n: int) -> bool:
    return await scrape(http, "batcher_requests_total", outcome="cancelled") == n


async def test_non_streaming_disconnect_cancels_too(server_factory: Factory) -> None:
    server = server_factory(*FAKE, "--fake-step", "0.2")
    async with (
        httpx.AsyncClient(base_url=server.url, timeout=30) as http,
        httpx.AsyncClient(base_url=server.url, timeout=30) as leaver,
    ):
        request = asyncio.ensure_future(
            leaver.post("/v1/completions", json={"prompt": "slow", "max_tokens": 100})
        )
        await wait_for(lambda: _running_is(http, 1), 5, "the request running")
        request.cancel()  # drops the connection
        with pytest.raises(asyncio.CancelledError):
            await request
        await wait_for(lambda: _cancelled_is(http, 1), 2, "the cancelled outcome")
        await wait_for(lambda: _running_is(http, 0), 2, "the batch to empty")


@pytest.mark.slow
async def test_queue_full_is_429_with_retry_after(server_factory: Factory) -> None:
    server = server_factory(*FAKE, "--fake-step", "0.1", "--max-queue", "2", "--max-batch-size", "1")
    async with httpx.AsyncClient(base_url=server.url, timeout=60) as http:
        body = {"prompt": "p", "max_tokens": 10}
        results = await asyncio.gather(*(http.post("/v1/completions", json=body) for _ in range(8)))
        statuses = sorted(r.status_code for r in results)
        assert statuses.count(200) >= 2 and statuses.count(429) >= 1, statuses
        assert set(statuses) == {200, 429}
        waits = []
        for r in results:
            if r.status_code == 429:
                # Retry-After in whole seconds (HTTP), retry-after-ms the jittered estimate itself
                waits.append(int(r.headers["retry-after-ms"]) / 1000)
                assert int(r.headers["retry-after"]) == max(1, math.ceil(waits[-1]))
                assert r.json()["error"]["code"] == "queue_full"
        # up to three requests of ten 0.1 s steps are ahead: a drain estimate, not a constant
        assert all(0.5 <= w <= 12 for w in waits), waits
        if len(waits) >= 3:
            assert len(set(waits)) > 1, f"no jitter: {waits}"
        assert await scrape(http, "batcher_requests_total", outcome="overloaded") == statuses.count(429)
        # a streaming request is refused the same way, before any SSE byte: fill the queue
        # (one running, two waiting) one request at a time, then stream
        pending = []
        for depth in (0, 1, 2):
            pending.append(asyncio.ensure_future(http.post("/v1/completions", json=body)))
            await wait_for(lambda d=depth: _queue_depth_is(http, d), 5, f"queue depth {depth}")
        r = await http.post("/v1/completions", json=body | {"stream": True})
        assert r.status_code == 429 and r.headers["content-type"] == "application/json"
        assert r.json()["error"]["code"] == "queue_full"
        assert [p.status_code for p in await asyncio.gather(*pending)] == [200] * 3
    async with openai.AsyncOpenAI(base_url=server.api, api_key="x", max_retries=0) as client:
        with pytest.raises(openai.RateLimitError):
            await asyncio.gather(
                *(client.completions.create(model="fake", prompt="p", max_tokens=10) for _ in range(8))
            )


async def _queue_depth_is(http: httpx.AsyncClient, depth: int) -> bool:
    text = (await http.get("/metrics")).text
    return metric(text, "batcher_queue_depth") == depth and metric(text, "batcher_running_requests") == 1


async def test_api_key(server_factory: Factory) -> None:
    server = server_factory(*FAKE, "--api-key", "s3cret")
    async with httpx.AsyncClient(base_url=server.url) as http:
        for path in ("/health", "/ready", "/metrics"):
            assert (await http.get(path)).status_code == 200, path
        r = await http.get("/v1/models")
        assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key"
        assert r.headers["www-authenticate"] == "Bearer"
        r = await http.post(
            "/v1/completions", json={"prompt": "x"}, headers={"authorization": "Bearer wrong"}
        )
        assert r.status_code == 401
        r = await http.get("/v1/models", headers={"authorization": "Bearer s3cret"})
        assert r.status_code == 200
    async with openai.AsyncOpenAI(base_url=server.api, api_key="wrong", max_retries=0) as bad:
        with pytest.raises(openai.AuthenticationError):
            await bad.completions.create(model="fake", prompt="x", max_tokens=2)
    async with openai.AsyncOpenAI(base_url=server.api, api_key="s3cret", max_retries=0) as good:
        r = await good.completions.create(model="fake", prompt="x", max_tokens=2)
        assert r.choices[0].text == expected_text("x", 2)


async def test_sigterm_drains_running_streams_then_exits_0(server_factory: Factory) -> None:
    server = server_factory(*FAKE, "--fake-step", "0.05", "--drain-timeout", "20")
    body = {"prompt": "drain me", "max_tokens": 30, "stream": True}
    async with (
        httpx.AsyncClient(base_url=server.url, timeout=30) as http,
        httpx.AsyncClient(base_url=server.url, timeout=30) as other,
    ):
        async with http.stream("POST", "/v1/completions", json=body) as r:
            lines = r.aiter_lines()
            first = await first_event(lines)
            server.proc.send_signal(signal.SIGTERM)
            await wait_for(lambda: _not_ready(other), 2, "/ready to turn 503")
            assert (await other.get("/health")).status_code == 200
            refused = await other.post("/v1/completions", json={"prompt": "late"})
            assert refused.status_code == 503 and refused.json()["error"]["code"] == "draining"
            events = [
                json.loads(line[6:])
                async for line in lines
                if line.startswith("data: ") and line != "data: [DONE]"
            ]
    text = first["choices"][0]["text"] + "".join(e["choices"][0]["text"] for e in events)
    assert text == expected_text("drain me", 30)
    assert events[-1]["choices"][0]["finish_reason"] == "length"
    assert await asyncio.to_thread(server.proc.wait, 15) == 0


async def _not_ready(http: httpx.AsyncClient) -> bool:
    return (await http.get("/ready")).status_code == 503


async def test_drain_timeout_ends_long_streams_with_an_error_event(server_factory: Factory) -> None:
    server = server_factory(*FAKE, "--fake-step", "0.05", "--drain-timeout", "0.3")
    body = {"prompt": "too long to drain", "max_tokens": 1000, "stream": True}
    async with httpx.AsyncClient(base_url=server.url, timeout=30) as http:
        async with http.stream("POST", "/v1/completions", json=body) as r:
            lines = r.aiter_lines()
            await first_event(lines)
            server.proc.send_signal(signal.SIGTERM)
            rest = [line async for line in lines if line.startswith("data: ")]
    assert rest[-1] == "data: [DONE]"
    assert json.loads(rest[-2][6:])["error"]["type"] == "service_unavailable"
    assert await asyncio.to_thread(server.proc.wait, 15) == 0


async def test_deadline_is_504_or_an_sse_timeout_event(server_factory: Factory) -> None:
    server = server_factory(*FAKE, "--fake-step", "0.1", "--default-deadline", "0.5")
    body = {"prompt": "too slow", "max_tokens": 50}
    async with httpx.AsyncClient(base_url=server.url, timeout=30) as http:
        r = await http.post("/v1/completions", json=body)
        assert r.status_code == 504 and r.json()["error"]["code"] == "deadline_exceeded"
        async with http.stream("POST", "/v1/completions", json=body | {"stream": True}) as r:
            events = [line async for line in r.aiter_lines() if line.startswith("data: ")]
        assert events[-1] == "data: [DONE]"
        assert json.loads(events[-2][6:])["error"]["type"] == "timeout_error"
        assert await scrape(http, "batcher_requests_total", outcome="deadline") == 2
