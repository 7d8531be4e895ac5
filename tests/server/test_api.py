"""The OpenAI-compatible API of the real server process (fake model), through the openai client."""

from __future__ import annotations

import asyncio
import json
from typing import Any

import httpx
import openai
import pytest

from .conftest import Server, expected_text, metric, wait_for


@pytest.fixture
async def client(fake_server: Server) -> openai.AsyncOpenAI:
    async with openai.AsyncOpenAI(base_url=fake_server.api, api_key="unused", max_retries=0) as c:
        yield c


async def test_probes_and_models(fake_server: Server) -> None:
    async with httpx.AsyncClient(base_url=fake_server.url) as http:
        assert (await http.get("/health")).json() == {"status": "ok"}
        assert (await http.get("/ready")).json() == {"status": "ready", "model": "fake"}
        models = (await http.get("/v1/models")).json()
        assert [m["id"] for m in models["data"]] == ["fake"]


async def test_completion_non_streaming(client: openai.AsyncOpenAI) -> None:
    r = await client.completions.create(model="fake", prompt="the quick brown fox", max_tokens=7)
    assert r.choices[0].text == expected_text("the quick brown fox", 7)
    assert r.choices[0].finish_reason == "length"
    assert (r.usage.prompt_tokens, r.usage.completion_tokens, r.usage.total_tokens) == (4, 7, 11)


async def test_chat_streaming_with_usage(client: openai.AsyncOpenAI) -> None:
    messages = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hi there"}]
    stream = await client.chat.completions.create(
        model="fake",
        messages=messages,
        max_tokens=6,
        stream=True,
        stream_options={"include_usage": True},
    )
    chunks = [c async for c in stream]
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == expected_text(messages, 6)
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "length"
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 6
    assert len({c.id for c in chunks}) == 1


async def test_stop_string_and_eos(client: openai.AsyncOpenAI) -> None:
    full = expected_text("stop here please", 8)
    cut = full.split(" ")[3]  # the third token's text: the stream must end just before it
    r = await client.completions.create(
        model="fake", prompt="stop here please", max_tokens=8, stop=[" " + cut]
    )
    assert r.choices[0].text == full[: full.index(" " + cut)]
    assert r.choices[0].finish_reason == "stop"
    r = await client.completions.create(model="fake", prompt="ends eos:3 soon", max_tokens=8)
    assert r.choices[0].finish_reason == "stop" and r.usage.completion_tokens == 3


async def test_sampling_parameters_reach_the_backend(client: openai.AsyncOpenAI) -> None:
    kwargs = dict(model="fake", prompt="seeded", max_tokens=5, temperature=0.7, top_p=0.9, seed=11)
    a = await client.completions.create(**kwargs, extra_body={"top_k": 40})
    assert a.choices[0].text == expected_text("seeded", 5, temperature=0.7, seed=11)
    assert a.choices[0].text != expected_text("seeded", 5)


async def test_32_concurrent_streams_each_get_exactly_their_own_output(
    fake_server: Server, client: openai.AsyncOpenAI
) -> None:
    async def one(i: int) -> tuple[str, str]:
        max_tokens = 8 + i % 9
        if i % 2:
            messages = [{"role": "user", "content": f"chat prompt number {i}"}]
            stream = await client.chat.completions.create(
                model="fake", messages=messages, max_tokens=max_tokens, stream=True
            )
            got = "".join([c.choices[0].delta.content or "" async for c in stream])
            return got, expected_text(messages, max_tokens)
        prompt = f"completion prompt number {i} " * (1 + i % 3)
        stream = await client.completions.create(
            model="fake", prompt=prompt, max_tokens=max_tokens, stream=True
        )
        got = "".join([c.choices[0].text async for c in stream])
        return got, expected_text(prompt, max_tokens)

    async with httpx.AsyncClient(base_url=fake_server.url) as http:
        before = await http.get("/metrics")
        results = await asyncio.gather(*(one(i) for i in range(32)))
        after = await http.get("/metrics")
    for got, want in results:
        assert got == want
    steps = metric(after.text, "batcher_batch_size_count") - metric(before.text, "batcher_batch_size_count")
    seqs = metric(after.text, "batcher_batch_size_sum") - metric(before.text, "batcher_batch_size_sum")
    assert seqs / steps > 4, "the 32 streams were not batched together"


async def test_error_after_the_stream_started_is_an_sse_event(fake_server: Server) -> None:
    body = {"prompt": "this will FAIL in the backend", "max_tokens": 4, "stream": True}
    async with httpx.AsyncClient(base_url=fake_server.url) as http:
        async with http.stream("POST", "/v1/completions", json=body) as r:
            assert r.status_code == 200
            lines = [line async for line in r.aiter_lines() if line]
    assert lines[-1] == "data: [DONE]"
    error = json.loads(lines[-2].removeprefix("data: "))["error"]
    assert error["type"] == "server_error" and "injected failure" in error["message"]


async def test_error_after_the_stream_started_raises_in_the_openai_client(
    client: openai.AsyncOpenAI,
) -> None:
    stream = await client.completions.create(model="fake", prompt="FAIL", max_tokens=4, stream=True)
    with pytest.raises(openai.APIError, match="injected failure"):
        async for _ in stream:
            pass


async def test_http_requests_are_counted_by_path_and_status(fake_server: Server) -> None:
    async with httpx.AsyncClient(base_url=fake_server.url) as http:
        before = (await http.get("/metrics")).text
        await http.get("/health")
        await http.get("/no/such/path?x=1")
        await http.post("/v1/completions", json={"prompt": ""})
        after = (await http.get("/metrics")).text

    def delta(**labels: str) -> float:
        name = "batcher_http_requests_total"
        return metric(after, name, **labels) - metric(before, name, **labels)

    assert delta(path="/health", status="200") == 1
    assert delta(path="other", status="404") == 1
    assert delta(path="/v1/completions", status="400") == 1
    assert metric(after, "batcher_requests_total", outcome="rejected") >= 1


async def test_served_model_names_aliases_and_model_not_found(server_factory: Any) -> None:
    server = server_factory(
        "--model", "fake", "--served-model-name", "main,alias-1", "--served-model-name", "org/alias-2"
    )
    async with openai.AsyncOpenAI(base_url=server.api, api_key="unused", max_retries=0) as client:
        assert [m.id async for m in client.models.list()] == ["main", "alias-1", "org/alias-2"]
        assert (await client.models.retrieve("org/alias-2")).id == "org/alias-2"
        r = await client.completions.create(model="alias-1", prompt="named", max_tokens=3)
        assert r.model == "main" and r.choices[0].text == expected_text("named", 3)
        for call in (
            client.completions.create(model="gpt-4o", prompt="x", max_tokens=3),
            client.models.retrieve("gpt-4o"),
        ):
            with pytest.raises(openai.NotFoundError) as e:
                await call
            assert e.value.code == "model_not_found"
    async with httpx.AsyncClient(base_url=server.url) as http:
        assert (await http.get("/ready")).json()["model"] == "main"
        text = (await http.get("/metrics")).text
    assert 'model="main"' in text


async def test_a_list_of_prompts_gives_one_choice_each(client: openai.AsyncOpenAI) -> None:
    prompts = ["first prompt", "the second one", "third"]
    r = await client.completions.create(model="fake", prompt=prompts, max_tokens=4)
    assert [c.index for c in r.choices] == [0, 1, 2]
    assert [c.text for c in r.choices] == [expected_text(p, 4) for p in prompts]
    assert r.usage.completion_tokens == 12 and r.usage.prompt_tokens == 2 + 3 + 1
    stream = await client.completions.create(
        model="fake", prompt=prompts, max_tokens=5, stream=True, stream_options={"include_usage": True}
    )
    texts = ["", "", ""]
    usage = None
    async for chunk in stream:
        for c in chunk.choices:
            texts[c.index] += c.text
        usage = chunk.usage or usage
    assert texts == [expected_text(p, 5) for p in prompts]
    assert usage is not None and usage.completion_tokens == 15


async def test_one_failing_prompt_of_a_list_ends_the_response_and_frees_the_others(
    fake_server: Server,
) -> None:
    prompts = ["a long fine one", "this will FAIL", "another fine one"]
    async with httpx.AsyncClient(base_url=fake_server.url, timeout=10) as http:
        r = await http.post("/v1/completions", json={"prompt": prompts, "max_tokens": 50})
        assert r.status_code == 500 and r.json()["error"]["code"] == "backend_failed"
        body = {"prompt": prompts, "max_tokens": 50, "stream": True}
        async with http.stream("POST", "/v1/completions", json=body) as s:
            lines = [line async for line in s.aiter_lines() if line]
        assert lines[-1] == "data: [DONE]" and "injected failure" in lines[-2]

        async def idle() -> bool:
            text = (await http.get("/metrics")).text
            return metric(text, "batcher_running_requests") + metric(text, "batcher_queue_depth") == 0

        await wait_for(idle, 5, "the other prompts to leave the batch")
    assert "Traceback" not in fake_server.output()
