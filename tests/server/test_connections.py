"""Connection hygiene: slow-loris and silent floods, malformed requests, the docs switch, keys and
tenants, a second signal (real server processes on loopback, bounded in count and time)."""

from __future__ import annotations

import asyncio
import contextlib
import json
import signal
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest

from .conftest import Server, metric

Factory = Callable[..., Server]
FAKE = ("--model", "fake")
SILENT, TRICKLING = 300, 60


async def _open(server: Server) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    host, port = server.url.removeprefix("http://").split(":")
    return await asyncio.open_connection(host, int(port))


async def _trickle(writer: asyncio.StreamWriter, stop: asyncio.Event) -> None:
    """A slow-loris client: a request head, one byte every 0.3 s, never finished."""
    head = b"POST /v1/completions HTTP/1.1\r\nhost: x\r\ncontent-type: application/json\r\nx-slow: "
    for byte in head + b"a" * 1000:
        if stop.is_set() or writer.is_closing():
            return
        try:
            writer.write(bytes([byte]))
            await writer.drain()
        except OSError:
            return
        await asyncio.sleep(0.3)


async def _close(writer: asyncio.StreamWriter) -> None:
    writer.close()
    with contextlib.suppress(OSError):
        await writer.wait_closed()


async def _closed_by_server(reader: asyncio.StreamReader, timeout: float) -> bool:
    try:
        while await asyncio.wait_for(reader.read(4096), timeout):
            pass  # a 503 refusal, then EOF
        return True
    except (ConnectionError, OSError):
        return True
    except TimeoutError:
        return False


@pytest.mark.slow
async def test_silent_and_slow_loris_floods_cannot_lock_out_health(server_factory: Factory) -> None:
    # ulimit -n 256 in the server, as in the issue: without a cap, 257 silent sockets lock it up.
    server = server_factory(*FAKE, "--header-timeout", "3", max_files=256)
    conns = [await _open(server) for _ in range(SILENT)]
    stop = asyncio.Event()
    slow = [await _open(server) for _ in range(TRICKLING)]
    tricklers = [asyncio.ensure_future(_trickle(w, stop)) for _, w in slow]
    try:
        await asyncio.sleep(0.5)  # the flood is in
        started = time.monotonic()
        async with httpx.AsyncClient(base_url=server.url, timeout=5) as http:
            health = await http.get("/health")
            health_s = time.monotonic() - started
            r = await http.post("/v1/completions", json={"prompt": "still served", "max_tokens": 4})
            completion_s = time.monotonic() - started
        print(
            f"under {SILENT} silent + {TRICKLING} trickling connections: /health in {health_s:.3f} s, "
            f"a completion by {completion_s:.3f} s"
        )
        assert health.status_code == 200 and health_s < 3, health_s
        assert r.status_code == 200 and completion_s < 5, completion_s
        # Every flood connection is closed: shed at the cap, or past the 3 s header deadline.
        everyone = conns + slow
        closed = await asyncio.gather(*(_closed_by_server(reader, 8) for reader, _ in everyone))
        assert all(closed), f"{closed.count(False)} of {len(everyone)} flood connections still open"
    finally:
        stop.set()
        await asyncio.gather(*tricklers)
        await asyncio.gather(*(_close(w) for _, w in conns + slow))
    assert "lowered from 1024 to 192" in server.output()


async def test_idle_keep_alive_and_slow_body_are_closed(server_factory: Factory) -> None:
    server = server_factory(*FAKE, "--keep-alive", "1", "--body-timeout", "1")
    reader, writer = await _open(server)
    writer.write(b"GET /health HTTP/1.1\r\nhost: x\r\n\r\n")
    assert b"200 OK" in await reader.readuntil(b"\r\n\r\n")
    started = time.monotonic()
    assert await _closed_by_server(reader, 4)
    assert 0.5 < time.monotonic() - started < 3
    await _close(writer)
    reader, writer = await _open(server)
    writer.write(b"POST /v1/completions HTTP/1.1\r\nhost: x\r\ncontent-length: 100\r\n\r\n{")
    started = time.monotonic()
    assert await _closed_by_server(reader, 4)
    assert 0.5 < time.monotonic() - started < 3
    await _close(writer)


@pytest.mark.parametrize(
    "raw",
    [
        b"POST /v1/completions HTTP/1.1\r\nhost: x\r\ncontent-length: 12abc\r\n\r\n{}",
        b"POST /v1/completions HTTP/1.1\r\nhost: x\r\ncontent-length: 1\r\ncontent-length: 2\r\n\r\n{}",
        b"NOT AN HTTP REQUEST\r\n\r\n",
    ],
)
async def test_malformed_http_gets_a_json_400(fake_server: Server, raw: bytes) -> None:
    reader, writer = await _open(fake_server)
    writer.write(raw)
    response = await asyncio.wait_for(reader.read(), 5)
    await _close(writer)
    head, _, body = response.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 400")
    assert b"content-type: application/json" in head.lower()
    assert json.loads(body)["error"]["code"] == "bad_http_request"


async def test_docs_are_off_by_default(fake_server: Server) -> None:
    async with httpx.AsyncClient(base_url=fake_server.url) as http:
        for path in ("/docs", "/redoc", "/openapi.json"):
            r = await http.get(path)
            assert r.status_code == 404 and r.json()["error"]["code"] == "not_found", path


async def test_docs_flag_serves_them_behind_the_key(server_factory: Factory, tmp_path: Path) -> None:
    keys = tmp_path / "keys"
    keys.write_text("k-docs\n")
    server = server_factory(*FAKE, "--docs", "--api-key-file", str(keys))
    async with httpx.AsyncClient(base_url=server.url) as http:
        for path in ("/docs", "/redoc", "/openapi.json"):
            assert (await http.get(path)).status_code == 401, path
            r = await http.get(path, headers={"authorization": "Bearer k-docs"})
            assert r.status_code == 200, path
        assert (
            "/v1/completions"
            in (await http.get("/openapi.json", headers={"authorization": "Bearer k-docs"})).json()["paths"]
        )


async def test_keys_from_a_file_and_the_environment_with_tenants(
    server_factory: Factory, tmp_path: Path
) -> None:
    keys = tmp_path / "keys"
    keys.write_text("# tenants\nk-alpha alpha 3\nk-beta beta\n")
    server = server_factory(*FAKE, "--api-key-file", str(keys), env={"LLM_BATCHER_API_KEY": "k-env"})
    counts = {"k-alpha": 3, "k-beta": 2, "k-env": 1}
    for key, n in counts.items():
        async with openai.AsyncOpenAI(base_url=server.api, api_key=key, max_retries=0) as client:
            for _ in range(n):
                await client.completions.create(model="fake", prompt="t", max_tokens=2)
    async with openai.AsyncOpenAI(base_url=server.api, api_key="k-wrong", max_retries=0) as client:
        with pytest.raises(openai.AuthenticationError):
            await client.completions.create(model="fake", prompt="t", max_tokens=2)
    async with httpx.AsyncClient(base_url=server.url) as http:
        text = (await http.get("/metrics")).text
    name, path = "batcher_http_requests_total", "/v1/completions"
    assert metric(text, name, path=path, status="200", tenant="alpha") == 3
    assert metric(text, name, path=path, status="200", tenant="beta") == 2
    assert metric(text, name, path=path, status="200", tenant="default") == 1
    assert "k-alpha" not in server.output() and "k-env" not in server.output()


async def _events(lines: Any, into: list[dict[str, Any] | str]) -> None:
    async for line in lines:
        if line.startswith("data: "):
            into.append("[DONE]" if line == "data: [DONE]" else json.loads(line[6:]))


async def test_a_second_signal_ends_streams_with_an_error_and_done_then_exits(
    server_factory: Factory,
) -> None:
    server = server_factory(*FAKE, "--fake-step", "0.05", "--drain-timeout", "60")
    body = {"prompt": "a very long story", "max_tokens": 2000, "stream": True}
    events: list[dict[str, Any] | str] = []
    async with httpx.AsyncClient(base_url=server.url, timeout=30) as http:
        plain = asyncio.ensure_future(
            http.post("/v1/completions", json={"prompt": "long", "max_tokens": 2000})
        )
        async with http.stream("POST", "/v1/completions", json=body) as r:
            reading = asyncio.ensure_future(_events(r.aiter_lines(), events))
            while len(events) < 3:
                await asyncio.sleep(0.02)
            server.proc.send_signal(signal.SIGTERM)  # drain: the streams go on
            await asyncio.sleep(0.5)
            assert not reading.done()
            server.proc.send_signal(signal.SIGTERM)
            started = time.monotonic()
            await asyncio.wait_for(reading, 5)
            ended_s = time.monotonic() - started
        refused = await plain
    assert events[-1] == "[DONE]" and isinstance(events[-2], dict)
    assert events[-2]["error"]["code"] == "unavailable" and "second signal" in events[-2]["error"]["message"]
    assert ended_s < 1.0, ended_s
    assert refused.status_code == 503 and "second signal" in refused.json()["error"]["message"]
    assert await asyncio.to_thread(server.proc.wait, 10) == 1
    assert "Traceback" not in server.output()
