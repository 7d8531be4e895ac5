"""``--ray-address``: deploy onto a Ray cluster that is already running, and leave it running.

The "cluster" is a head started by ``ray start --head --block`` on 127.0.0.1, both processes run
with the environment below.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from .conftest import ROOT, expected_text, free_port

pytestmark = pytest.mark.slow

# Node address on loopback; token auth as a local ray.init has it (the driver then loads the same
# ~/.ray/auth_token the head wrote); a stopping head does not wait out its 30 s drain.
LOOPBACK_ENV = {
    "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0",
    "RAY_AUTH_MODE": "token",
    "RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S": "2",
}


def _env() -> dict[str, str]:
    clean = {k: v for k, v in os.environ.items() if not k.startswith(("LLM_BATCHER_", "RAY_"))}
    return clean | LOOPBACK_ENV


@pytest.fixture
def head(tmp_path: Path) -> Iterator[str]:
    """A Ray head on 127.0.0.1 (2 CPUs, no dashboard); yields its address; SIGTERM stops it."""
    port = free_port()
    ray = Path(sys.executable).parent / "ray"
    log = tmp_path / "head.log"
    args = [str(ray), "start", "--head", "--block", "--node-ip-address=127.0.0.1", f"--port={port}"]
    args += ["--num-cpus=2", "--include-dashboard=false", "--disable-usage-stats"]
    with log.open("wb") as out:
        proc = subprocess.Popen(args, stdout=out, stderr=subprocess.STDOUT, env=_env())
    try:
        deadline = time.monotonic() + 60
        while "Ray runtime started" not in log.read_text(errors="replace"):
            assert proc.poll() is None and time.monotonic() < deadline, log.read_text()[-3000:]
            time.sleep(0.2)
        yield f"127.0.0.1:{port}"
        assert proc.poll() is None, "the cluster stopped with the command that joined it"
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(60)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def test_ray_address_deploys_onto_the_cluster_and_leaves_it_running(head: str, tmp_path: Path) -> None:
    port = free_port()
    log = tmp_path / "join.log"
    cmd = [sys.executable, "-m", "batcher.adapters.ray", "--ray-address", head, "--replicas", "1"]
    cmd += ["--model", "fake", "--port", str(port), "--cpus-per-replica", "0.5", "--log-level", "warning"]
    with log.open("wb") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, cwd=ROOT, env=_env())
    try:
        deadline = time.monotonic() + 120
        while "llm-batcher: ready on" not in log.read_text(errors="replace"):
            assert proc.poll() is None and time.monotonic() < deadline, log.read_text()[-3000:]
            time.sleep(0.2)
        body = {"model": "fake", "prompt": "joined", "max_tokens": 5}
        r = httpx.post(f"http://127.0.0.1:{port}/v1/completions", json=body, timeout=30)
        assert r.status_code == 200 and r.json()["choices"][0]["text"] == expected_text("joined", 5)
    finally:
        proc.send_signal(signal.SIGTERM)
        status = proc.wait(60)
    assert status == 0, log.read_text()[-3000:]
    # The application is gone; Serve's proxy, part of the cluster, still answers.
    gone = httpx.post(f"http://127.0.0.1:{port}/v1/completions", json=body, timeout=30)
    assert gone.status_code == 404
