"""Bad input gets a 4xx with an OpenAI-style error body, never a 500 (raw httpx)."""

from __future__ import annotations

from typing import Any

import httpx
import pytest

from .conftest import Server


def assert_error(
    r: httpx.Response, status: int, param: str | None = None, code: str | None = None
) -> dict[str, Any]:
    assert r.status_code == status, r.text
    assert r.headers["content-type"].startswith("application/json")
    error = r.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert isinstance(error["message"], str) and error["message"]
    if param is not None:
        assert error["param"] == param, error
    if code is not None:
        assert error["code"] == code, error
    return error


@pytest.fixture
async def http(fake_server: Server) -> httpx.AsyncClient:
    async with httpx.AsyncClient(base_url=fake_server.url, timeout=10) as c:
        yield c


@pytest.mark.parametrize("raw", [b"{bad json", b"", b"[1, 2]", b"null", b'"text"', b"\xff\xfe"])
async def test_malformed_json_is_400(http: httpx.AsyncClient, raw: bytes) -> None:
    r = await http.post("/v1/completions", content=raw, headers={"content-type": "application/json"})
    assert_error(r, 400)


@pytest.mark.parametrize(
    ("body", "param"),
    [
        ({"max_tokens": 4}, "prompt"),
        ({"prompt": ""}, "prompt"),
        ({"prompt": []}, "prompt"),
        ({"prompt": ["a"] * 65}, "prompt"),
        ({"prompt": [1, -2, 3]}, "prompt"),
        ({"prompt": [[1, 2], []]}, "prompt"),
        ({"prompt": [1, "two"]}, "prompt"),
        ({"prompt": [[1], ["a"]]}, "prompt"),
        ({"prompt": "x", "n": 0}, "n"),
        ({"prompt": ["x", "y"], "n": 33}, "n"),
        ({"prompt": "x", "max_tokens": 0}, "max_tokens"),
        ({"prompt": "x", "max_tokens": "5"}, "max_tokens"),
        ({"prompt": "x", "max_tokens": 10**9}, "max_tokens"),
        ({"prompt": "x", "temperature": -1}, "temperature"),
        ({"prompt": "x", "temperature": 2.01}, "temperature"),
        ({"prompt": "x", "temperature": 5}, "temperature"),
        ({"prompt": "x", "temperature": "hot"}, "temperature"),
        ({"prompt": "x", "top_p": 0}, "top_p"),
        ({"prompt": "x", "top_k": -3}, "top_k"),
        ({"prompt": "x", "seed": -1}, "seed"),
        ({"prompt": "x", "stop": [""]}, "stop"),
        ({"prompt": "x", "stop": ["s"] * 17}, "stop"),
        ({"prompt": "x", "stream": "yes"}, "stream"),
        ({"prompt": "x", "echo": True}, "echo"),
        ({"prompt": "x", "unheard_of": 1}, "unheard_of"),
        ({"prompt": "x", "messages": []}, "messages"),
        ({"prompt": "x", "logprobs": 6}, "logprobs"),
        ({"prompt": "x", "logprobs": True}, "logprobs"),
        ({"prompt": "x", "stream_options": {"include_usage": "y"}}, "stream_options.include_usage"),
    ],
)
async def test_bad_completion_parameters_are_400(
    http: httpx.AsyncClient, body: dict[str, Any], param: str | None
) -> None:
    assert_error(await http.post("/v1/completions", json=body), 400, param)


@pytest.mark.parametrize(
    ("body", "param"),
    [
        ({"messages": []}, "messages"),
        ({"messages": [{"role": "wizard", "content": "hi"}]}, "messages.0.role"),
        ({"messages": [{"role": "user"}]}, "messages.0.content"),
        ({"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {}}]}]}, None),
        ({"messages": "hello"}, "messages"),
        (
            {"messages": [{"role": "user", "content": "x"}], "max_tokens": 3, "max_completion_tokens": 4},
            "max_completion_tokens",
        ),
    ],
)
async def test_bad_chat_parameters_are_400(
    http: httpx.AsyncClient, body: dict[str, Any], param: str | None
) -> None:
    assert_error(await http.post("/v1/chat/completions", json=body), 400, param)


@pytest.mark.parametrize("max_tokens", [-1, 0, 32769, 1_000_000])
async def test_one_max_tokens_limit_stated_once(http: httpx.AsyncClient, max_tokens: int) -> None:
    for path, body in (
        ("/v1/completions", {"prompt": "x", "max_tokens": max_tokens}),
        ("/v1/chat/completions", {"messages": [{"role": "user", "content": "x"}], "max_tokens": max_tokens}),
        (
            "/v1/chat/completions",
            {"messages": [{"role": "user", "content": "x"}], "max_completion_tokens": max_tokens},
        ),
    ):
        error = assert_error(await http.post(path, json=body), 400, "max_tokens")
        assert (
            error["message"]
            == f"max_tokens must be an integer in [1, 32768] (this server's limit), got {max_tokens}"
        )


async def test_bad_token_id_prompts_get_a_clear_400(http: httpx.AsyncClient) -> None:
    error = assert_error(await http.post("/v1/completions", json={"prompt": [5, -6]}), 400, "prompt")
    assert error["message"] == "token-id prompts hold non-negative integers, got -6"
    long = {"prompt": list(range(5000)), "max_tokens": 2}  # the fake server's context: 4096
    error = assert_error(await http.post("/v1/completions", json=long), 400, "prompt")
    assert "5000 token ids" in error["message"]


async def test_prompt_too_long_is_400_context_length_exceeded(http: httpx.AsyncClient) -> None:
    r = await http.post("/v1/completions", json={"prompt": "word " * 5000, "max_tokens": 4})
    assert_error(r, 400, "prompt", "context_length_exceeded")
    r = await http.post("/v1/completions", json={"prompt": "word " * 5000, "stream": True})
    assert_error(r, 400, "prompt", "context_length_exceeded")  # known before the stream starts


async def test_backend_rejection_is_400_before_streaming(http: httpx.AsyncClient) -> None:
    r = await http.post("/v1/completions", json={"prompt": "REJECT me", "stream": True})
    assert_error(r, 400, "prompt")


async def test_body_over_the_limit_is_413(http: httpx.AsyncClient) -> None:
    big = {"prompt": "x" * (1 << 20)}
    assert_error(await http.post("/v1/completions", json=big), 413, code="request_too_large")

    async def chunked() -> Any:  # no content-length: the limit applies while reading
        for _ in range(20):
            yield b" " * 65536
        yield b'{"prompt": "x"}'

    r = await http.post("/v1/completions", content=chunked(), headers={"content-type": "application/json"})
    assert_error(r, 413, code="request_too_large")


async def test_unknown_route_and_method(http: httpx.AsyncClient) -> None:
    assert_error(await http.get("/v1/nothing"), 404, code="not_found")
    assert_error(await http.get("/v1/completions"), 405)
