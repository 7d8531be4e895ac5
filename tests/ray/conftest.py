"""Fixtures of the Ray Serve tests: ``llm-batcher serve --replicas ...`` in a subprocess, on loopback.

Each server starts its own local Ray (127.0.0.1, no dashboard, 2 CPUs, each replica reserving
half a CPU) with Serve's HTTP proxy on a free loopback port, serves the fake backend, and is
stopped by SIGTERM (the replicas drain, Ray shuts down) when its fixture ends.
"""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import sys
import time
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest
from pydantic.warnings import PydanticDeprecatedSince20

from batcher.backend import SamplingParams
from batcher.testing import FakeBackend

# Ray Serve 2.60's own models use a Pydantic field option deprecated in Pydantic 2: the warning
# fires once, when ray.serve is first imported. Import it here with that warning (only) silenced;
# every other warning stays an error.
with warnings.catch_warnings():
    warnings.filterwarnings("ignore", category=PydanticDeprecatedSince20, module=r"ray\.")
    import ray.serve  # noqa: F401

ROOT = Path(__file__).resolve().parents[2]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass
class RayServer:
    url: str
    proc: subprocess.Popen[bytes]
    log: Path

    @property
    def api(self) -> str:
        return self.url + "/v1"

    def output(self) -> str:
        return self.log.read_text(errors="replace")

    def metrics(self) -> str:
        return httpx.get(self.url + "/metrics", timeout=10).text

    def replicas(self) -> dict[str, int]:
        """Replica id → pid, from ``batcher_replica_info`` on the proxy's /metrics."""
        found = re.findall(
            r'^batcher_replica_info\{pid="(\d+)",replica="(\w+)"\} 1\.0$', self.metrics(), re.M
        )
        return {replica: int(pid) for pid, replica in found}

    def wait_for_replicas(
        self, count: int, timeout: float, exclude: set[str] = frozenset()
    ) -> dict[str, int]:
        """Poll /metrics (another process: no event to wait on) until ``count`` replicas report."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            now = {r: p for r, p in self.replicas().items() if r not in exclude}
            if len(now) == count:
                return now
            time.sleep(0.5)
        raise AssertionError(f"not {count} replicas after {timeout} s: {self.replicas()}")

    def stop(self, timeout: float = 60.0) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
            raise AssertionError(f"server did not exit in {timeout} s:\n{self.output()[-3000:]}") from None


def start_ray_server(tmp: Path, *args: str, ready_timeout: float = 120.0) -> RayServer:
    """``llm-batcher serve --model fake ARGS`` (the console script's code path) on a free port, ready
    when it says so; ARGS carry ``--replicas`` or ``--ray-address``."""
    port = free_port()
    log = tmp / f"ray-server-{port}.log"
    cmd = [
        sys.executable,
        "-m",
        "batcher.adapters._cli",
        "serve",
        "--model",
        "fake",
        "--port",
        str(port),
        "--ray-cpus",
        "2",
        "--cpus-per-replica",
        "0.5",
        "--log-level",
        "warning",
        *args,
    ]
    env = {k: v for k, v in os.environ.items() if not k.startswith(("LLM_BATCHER_", "RAY_"))}
    with log.open("wb") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, cwd=ROOT, env=env)
    server = RayServer(f"http://127.0.0.1:{port}", proc, log)
    deadline = time.monotonic() + ready_timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise AssertionError(f"server exited with {proc.returncode}:\n{server.output()[-3000:]}")
        if "llm-batcher: ready on" in server.output():
            return server
        time.sleep(0.2)
    server.stop()
    raise AssertionError(f"server not ready in {ready_timeout} s:\n{server.output()[-3000:]}")


@pytest.fixture(scope="module")
def ray_server_factory(tmp_path_factory: pytest.TempPathFactory) -> Iterator[object]:
    started: list[RayServer] = []

    def factory(*args: str) -> RayServer:
        s = start_ray_server(tmp_path_factory.mktemp("ray"), *args)
        started.append(s)
        return s

    yield factory
    for s in started:
        if s.proc.poll() is None:
            assert s.stop() == 0, s.output()[-3000:]


def expected_text(prompt: str, max_tokens: int) -> str:
    """What the replicas' FakeBackend answers for ``prompt`` (greedy, no stop strings)."""
    fake = FakeBackend()
    return "".join(map(fake.token_text, fake.expected_tokens(prompt, SamplingParams(max_tokens=max_tokens))))


def metric(text: str, name: str, **labels: str) -> dict[str, float]:
    """Sum of the samples of ``name`` matching ``labels`` in a /metrics text, by ``replica``."""
    by_replica: dict[str, float] = {}
    for line in text.splitlines():
        m = re.match(r"^([a-zA-Z_:][\w:]*)(?:\{(.*)\})? (\S+)$", line)
        if not m or m.group(1) != name:
            continue
        have = dict(re.findall(r'(\w+)="((?:[^"\\]|\\.)*)"', m.group(2) or ""))
        if all(have.get(k) == v for k, v in labels.items()):
            replica = have.get("replica", "")
            by_replica[replica] = by_replica.get(replica, 0.0) + float(m.group(3))
    return by_replica
