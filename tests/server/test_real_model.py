"""The server over the real SmolLM2 (float32, where batched greedy output equals solo output)."""

from __future__ import annotations

import asyncio

import httpx
import openai
import pytest

from .conftest import Server

pytestmark = pytest.mark.model

TOPICS = [
    "the sea",
    "a lighthouse",
    "autumn",
    "bread",
    "trains",
    "owls",
    "rain",
    "chess",
    "the moon",
    "bicycles",
    "tea",
    "volcanoes",
    "libraries",
    "snow",
    "bees",
    "rivers",
]
MAX_TOKENS = 10


def request(i: int) -> dict[str, object]:
    """Request i of 32: chat for odd i, completion for even i, all greedy and distinct."""
    topic = TOPICS[i % len(TOPICS)]
    if i % 2:
        return {"messages": [{"role": "user", "content": f"Write one sentence about {topic}."}]}
    return {"prompt": f"Here is a short story about {topic}, number {i}:"}


async def run(real_client: openai.AsyncOpenAI, i: int, *, stream: bool) -> str:
    body = request(i)
    kwargs = dict(model="SmolLM2-135M-Instruct", max_tokens=MAX_TOKENS, temperature=0, stream=stream)
    if "messages" in body:
        r = await real_client.chat.completions.create(messages=body["messages"], **kwargs)  # type: ignore[arg-type]
        if not stream:
            return r.choices[0].message.content or ""
        return "".join([c.choices[0].delta.content or "" async for c in r if c.choices])
    r = await real_client.completions.create(prompt=body["prompt"], **kwargs)  # type: ignore[arg-type]
    if not stream:
        return r.choices[0].text
    return "".join([c.choices[0].text async for c in r])


async def test_32_concurrent_streams_equal_their_solo_greedy_outputs(
    real_client: openai.AsyncOpenAI, real_server: Server
) -> None:
    solo = [await run(real_client, i, stream=False) for i in range(32)]  # one at a time
    assert all(solo) and len(set(solo)) > 16
    together = await asyncio.gather(*(run(real_client, i, stream=True) for i in range(32)))
    for i, (alone, batched) in enumerate(zip(solo, together, strict=True)):
        assert batched == alone, f"request {i}: {batched!r} != solo {alone!r}"
    async with httpx.AsyncClient(base_url=real_server.url) as http:
        text = (await http.get("/metrics")).text
    assert 'batcher_requests_total{engine="0",model="SmolLM2-135M-Instruct",outcome="finished"}' in text


async def test_prompt_over_the_context_window_is_400(real_server: Server) -> None:
    async with httpx.AsyncClient(base_url=real_server.url, timeout=60) as http:
        r = await http.post("/v1/completions", json={"prompt": "hello " * 9000, "stream": True})
    assert r.status_code == 400, r.text
    assert r.json()["error"]["code"] == "context_length_exceeded"


async def test_usage_counts_real_tokens(real_client: openai.AsyncOpenAI) -> None:
    r = await real_client.chat.completions.create(
        model="SmolLM2-135M-Instruct", messages=[{"role": "user", "content": "Say hi."}], max_tokens=5
    )
    assert r.usage.prompt_tokens > 5 and 1 <= r.usage.completion_tokens <= 5
    assert r.usage.total_tokens == r.usage.prompt_tokens + r.usage.completion_tokens
