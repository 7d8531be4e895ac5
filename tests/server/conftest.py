"""Fixtures for the example server's tests: real servers in subprocesses on free loopback ports.

Every server is ``python -m batcher.adapters._cli serve ...`` (the console script's code path,
uvicorn with uvloop) and is driven over real sockets, by the ``openai`` client or raw httpx.
"""

from __future__ import annotations

import asyncio
import os
import re
import resource
import signal
import socket
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest

from batcher.backend import SamplingParams
from batcher.testing import FakeBackend

ROOT = Path(__file__).resolve().parents[2]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass
class Server:
    url: str
    proc: subprocess.Popen[bytes]
    log: Path

    @property
    def api(self) -> str:
        return self.url + "/v1"

    def output(self) -> str:
        return self.log.read_text(errors="replace")

    def stop(self, timeout: float = 30.0) -> int:
        """SIGTERM (drain), then wait; kill if it hangs. Returns the exit status."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
            raise AssertionError(f"server did not exit in {timeout} s:\n{self.output()[-3000:]}") from None


def start_server(
    tmp: Path,
    *args: str,
    ready_timeout: float = 60.0,
    env: dict[str, str] | None = None,
    max_files: int | None = None,
) -> Server:
    """Start ``llm-batcher serve ARGS`` on a free port and wait until /ready answers 200
    (``max_files``: the server's ``ulimit -n``, soft and hard)."""
    port = free_port()
    log = tmp / f"server-{port}.log"
    cmd = [
        sys.executable,
        "-m",
        "batcher.adapters._cli",
        "serve",
        "--port",
        str(port),
        "--log-level",
        "warning",
        *args,
    ]
    full_env = {k: v for k, v in os.environ.items() if not k.startswith("LLM_BATCHER_")}
    full_env |= env or {}
    with log.open("wb") as out:
        proc = subprocess.Popen(
            cmd,
            stdout=out,
            stderr=subprocess.STDOUT,
            cwd=ROOT,
            env=full_env,
            preexec_fn=None if max_files is None else lambda: _limit_files(max_files),
        )
    server = Server(f"http://127.0.0.1:{port}", proc, log)
    deadline = time.monotonic() + ready_timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise AssertionError(f"server exited with {proc.returncode}:\n{server.output()[-3000:]}")
        try:
            if httpx.get(server.url + "/ready", timeout=1).status_code == 200:
                return server
        except httpx.TransportError:
            pass
        time.sleep(0.05)
    server.stop()
    raise AssertionError(f"server not ready in {ready_timeout} s:\n{server.output()[-3000:]}")


def _limit_files(n: int) -> None:
    resource.setrlimit(resource.RLIMIT_NOFILE, (n, n))


@pytest.fixture
def server_factory(tmp_path: Path) -> Iterator[object]:
    """``server_factory(*flags)`` starts a fake-model server; all are stopped after the test."""
    started: list[Server] = []

    def factory(*args: str, **kwargs: object) -> Server:
        s = start_server(tmp_path, *args, **kwargs)  # type: ignore[arg-type]
        started.append(s)
        return s

    yield factory
    for s in started:
        if s.proc.poll() is None:
            s.stop()


@pytest.fixture(scope="session")
def real_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    """One server on the real SmolLM2 (float32) shared by the real-model test modules, so the model
    loads once; tests that read counters compare before and after."""
    pytest.importorskip("torch")
    s = start_server(tmp_path_factory.mktemp("real"), "--dtype", "float32", ready_timeout=240)
    yield s
    assert s.stop() == 0, s.output()[-3000:]


@pytest.fixture
async def real_client(real_server: Server) -> AsyncIterator[openai.AsyncOpenAI]:
    async with openai.AsyncOpenAI(base_url=real_server.api, api_key="x", max_retries=0, timeout=300) as c:
        yield c


@pytest.fixture(scope="module")
def fake_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    """One shared fake-model server (5 ms steps) for the tests that only read from it."""
    s = start_server(
        tmp_path_factory.mktemp("fake"),
        "--model",
        "fake",
        "--fake-step",
        "0.005",
        "--fake-step-per-seq",
        "0.0002",
        "--batch-window",
        "0.01",
    )
    yield s
    assert s.stop() == 0, s.output()[-3000:]


def expected_text(prompt: str | list[dict[str, str]], max_tokens: int, **params: object) -> str:
    """What the server's FakeBackend answers for ``prompt`` (no stop strings)."""
    fake = FakeBackend()
    ids = fake.expected_tokens(prompt, SamplingParams(max_tokens=max_tokens, **params))  # type: ignore[arg-type]
    return "".join(fake.token_text(t) for t in ids)


async def streamed_logprobs(stream: Any) -> list[Any]:
    """Every token log-probability entry of a streamed chat completion, in order."""
    return [
        t
        async for c in stream
        if c.choices and c.choices[0].logprobs
        for t in c.choices[0].logprobs.content or ()
    ]


def metric(text: str, name: str, **labels: str) -> float:
    """Sum of the samples of ``name`` whose labels include ``labels``, in a /metrics text."""
    total = 0.0
    for line in text.splitlines():
        m = re.match(r"^([a-zA-Z_:][\w:]*)(?:\{(.*)\})? (\S+)$", line)
        if not m or m.group(1) != name:
            continue
        have = dict(re.findall(r'(\w+)="((?:[^"\\]|\\.)*)"', m.group(2) or ""))
        if all(have.get(k) == v for k, v in labels.items()):
            total += float(m.group(3))
    return total


async def wait_for(check: Callable[[], Any], timeout: float, what: str) -> float:
    """Await ``check()`` until truthy; return the seconds it took."""
    start = time.monotonic()
    while not await check():
        if time.monotonic() - start > timeout:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}")
        await asyncio.sleep(0.02)
    return time.monotonic() - start
