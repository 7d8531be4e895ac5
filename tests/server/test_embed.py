"""examples/embed_fastapi.py: the batcher inside someone else's FastAPI app, via its lifespan."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from .conftest import ROOT, expected_text, free_port


@pytest.fixture
def embed_url(tmp_path: Path) -> Iterator[str]:
    port = free_port()
    log = (tmp_path / "embed.log").open("wb")
    env = os.environ | {"LLM_BATCHER_MODEL": "fake"}
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "uvicorn",
            "examples.embed_fastapi:app",
            "--port",
            str(port),
            "--loop",
            "uvloop",
            "--log-level",
            "warning",
        ],
        cwd=ROOT,
        env=env,
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 30
        while True:
            assert proc.poll() is None, (tmp_path / "embed.log").read_text()
            try:
                httpx.get(url + "/openapi.json", timeout=1)
                break
            except httpx.TransportError:
                assert time.monotonic() < deadline, "embed app did not start"
                time.sleep(0.05)
        yield url
    finally:
        proc.terminate()
        proc.wait(30)
        log.close()


async def test_streaming_route_of_the_embedded_batcher(embed_url: str) -> None:
    async with httpx.AsyncClient(base_url=embed_url, timeout=30) as http:
        async with http.stream("GET", "/generate", params={"prompt": "hello there", "max_tokens": 12}) as r:
            assert r.status_code == 200
            pieces = [p async for p in r.aiter_text()]
        assert "".join(pieces) == expected_text("hello there", 12)
        r = await http.get("/generate", params={"prompt": "REJECT this"})
        assert r.status_code == 400
