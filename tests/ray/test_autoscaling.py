"""Autoscaling on the batchers' queue depth: a scale-down under load cuts no stream.

The server starts 2 replicas, autoscaling between 1 and 2 with a target of 16 queued + running
requests per replica and a 6 s downscale delay. 8 short and 12 long streams start together
(20 > 16: two replicas wanted); once the short ones end, 12 < 16 wants one replica, and six
seconds later Serve stops one of the two while its long streams still run (the controller's log
line says when, and which). Serve stops routing to it and waits for its streams; only then the
replica drains its batcher and leaves. Every stream must end complete, with no error event.
"""

from __future__ import annotations

import asyncio
import re
import time
from collections.abc import Callable
from typing import Any

import httpx
import pytest

from .conftest import RayServer, expected_text
from .test_replicas import _sse

pytestmark = pytest.mark.slow


async def test_scale_down_under_load_cuts_no_stream(ray_server_factory: Callable[..., RayServer]) -> None:
    server = ray_server_factory(
        *("--replicas", "2", "--min-replicas", "1", "--max-replicas", "2", "--target-work", "16"),
        *("--upscale-delay", "0", "--downscale-delay", "6", "--fake-step", "0.03"),
    )
    both = server.wait_for_replicas(2, timeout=30)
    short = [(f"short {i}", 60) for i in range(8)]
    long = [(f"long {i}", 500) for i in range(12)]
    logs: list[dict[str, Any]] = [{"first": asyncio.Event()} for _ in short + long]
    async with httpx.AsyncClient(base_url=server.url, timeout=90) as http:
        started = time.monotonic()
        tasks = []
        for (p, n), log in zip(short + long, logs, strict=True):
            tasks.append(asyncio.create_task(_sse(http, p, n, log)))
            # Arrivals a moment apart, as clients are: the router sees each one's queued work
            # before it places the next (20 at the same instant could all land on one replica).
            await asyncio.sleep(0.05)
        await asyncio.gather(*tasks[: len(short)])
        long_logs = logs[len(short) :]
        assert {log["replica"] for log in long_logs} == set(both), "long streams did not reach both replicas"

        # Serve's controller logs its decision (forwarded to the server's output): it must come
        # while the long streams, on both replicas, are still running.
        removing = "Removing 1 replica from Deployment(name='BatcherReplica'"
        while removing not in server.output():
            assert not all(t.done() for t in tasks), "no scale-down before the long streams ended"
            await asyncio.sleep(0.25)
        running = {r: sum(1 for log in long_logs if log["replica"] == r and "ended" not in log) for r in both}
        print(
            f"scale-down decided {time.monotonic() - started:.1f} s in, streams running by replica: {running}"
        )
        assert all(n > 0 for n in running.values())
        await asyncio.wait_for(asyncio.gather(*tasks), 60)
    for (prompt, n), log in zip(short + long, logs, strict=True):
        assert log["done"] and not log["errors"], log
        assert "".join(log["texts"]) == expected_text(prompt, n), prompt
    print(f"all {len(logs)} streams complete after {time.monotonic() - started:.1f} s")
    # The stopping replica leaves once its streams are done and its batcher drained.
    pattern = re.compile(r"Replica\(id='(\w+)', deployment='BatcherReplica'.*\) is stopped")
    deadline = time.monotonic() + 30
    while (stopped := pattern.search(server.output())) is None:
        assert time.monotonic() < deadline, server.output()[-3000:]
        await asyncio.sleep(0.25)
    assert stopped.group(1) in both
    left = server.wait_for_replicas(1, timeout=20)
    assert set(left) == set(both) - {stopped.group(1)}
