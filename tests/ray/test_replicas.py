"""Two replicas on Ray Serve, fake backend, driven through Serve's HTTP proxy on loopback.

One server for the module (``--replicas 2``, 20 ms steps): 64 concurrent streams through the
official ``openai`` client; a client disconnect; then a replica killed mid-stream (last: it
leaves the deployment with a replacement replica).
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest

from ..monitoring._harness import dashboard, expand, prom_api, prometheus, query_panels
from .conftest import RayServer, expected_text, metric

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def server(ray_server_factory: Callable[..., RayServer]) -> RayServer:
    s = ray_server_factory("--replicas", "2", "--fake-step", "0.02", "--fake-step-per-seq", "0.0005")
    s.wait_for_replicas(2, timeout=30)
    return s


async def until(check: Callable[[], bool], timeout: float, what: str) -> None:
    """Wait for a condition another process makes true (there is no event to wait on): poll."""
    deadline = asyncio.get_running_loop().time() + timeout
    while not check():
        if asyncio.get_running_loop().time() > deadline:
            raise AssertionError(f"{what}: not within {timeout} s")
        await asyncio.sleep(0.25)


async def test_64_concurrent_streams_each_get_exactly_their_tokens_from_both_replicas(
    server: RayServer,
) -> None:
    before = metric(server.metrics(), "batcher_requests_total", outcome="finished")

    async def one(client: openai.AsyncOpenAI, i: int) -> tuple[str, str, str]:
        prompt, max_tokens = f"prompt number {i} of the batch", 12 + i % 9
        if i % 2:
            chat = await client.chat.completions.create(
                model="fake",
                messages=[{"role": "user", "content": prompt}],
                max_tokens=max_tokens,
                stream=True,
            )
            text = "".join([c.choices[0].delta.content or "" async for c in chat if c.choices])
            return (
                chat.response.headers["x-llm-batcher-replica"],
                text,
                expected_text(f"user: {prompt}", max_tokens),
            )
        plain = await client.completions.create(
            model="fake", prompt=prompt, max_tokens=max_tokens, stream=True
        )
        text = "".join([c.choices[0].text async for c in plain])
        return plain.response.headers["x-llm-batcher-replica"], text, expected_text(prompt, max_tokens)

    async with openai.AsyncOpenAI(base_url=server.api, api_key="unused", max_retries=0) as client:
        results = await asyncio.wait_for(asyncio.gather(*(one(client, i) for i in range(64))), 60)
    for i, (_, text, want) in enumerate(results):
        assert text == want, f"stream {i}"
    served = {replica for replica, _, _ in results}
    assert len(served) == 2, f"one replica served everything: {served}"

    def finished() -> dict[str, float]:
        now = metric(server.metrics(), "batcher_requests_total", outcome="finished")
        return {r: now.get(r, 0) - before.get(r, 0) for r in now}

    await until(lambda: sum(finished().values()) == 64, 10, "64 finished requests in the hub's metrics")
    per_replica = finished()
    print("finished requests by replica:", per_replica)
    assert set(per_replica) == served and all(n > 0 for n in per_replica.values())
    # Batches were not capped at Serve's default max_ongoing_requests of 5.
    text = server.metrics()
    steps = sum(metric(text, "batcher_batch_size_count").values())
    small = sum(metric(text, "batcher_batch_size_bucket", le="4.0").values())
    print(f"steps: {steps:.0f}, of which batch <= 4: {small:.0f}")
    assert sum(metric(text, "batcher_batch_size_sum").values()) / steps > 5


async def test_client_disconnect_cancels_the_request_inside_its_replica(server: RayServer) -> None:
    before = metric(server.metrics(), "batcher_requests_total", outcome="cancelled")
    body = {"model": "fake", "prompt": "a very long answer", "max_tokens": 3000, "stream": True}
    async with httpx.AsyncClient(base_url=server.url, timeout=30) as http:
        async with http.stream("POST", "/v1/completions", json=body) as response:
            replica = response.headers["x-llm-batcher-replica"]
            lines = response.aiter_lines()
            while not (await anext(lines)).startswith("data: {"):
                pass
    # The connection is closed; the replica's batcher must count the request as cancelled.

    def cancelled() -> float:
        now = metric(server.metrics(), "batcher_requests_total", outcome="cancelled")
        return now.get(replica, 0) - before.get(replica, 0)

    await until(lambda: cancelled() == 1, 10, f"a cancelled request on replica {replica}")
    running = metric(server.metrics(), "batcher_running_requests")
    assert running.get(replica) == 0, running


@pytest.mark.prometheus
async def test_prometheus_scrapes_every_replica_from_the_proxy_port(
    server: RayServer, tmp_path: Path
) -> None:
    """A Prometheus on 127.0.0.1 scrapes the proxy's /metrics: the replica variable finds both
    replicas, and the dashboard's panels by replica draw one series each."""
    replicas = set(server.wait_for_replicas(2, timeout=10))
    target = server.url.removeprefix("http://")
    async with openai.AsyncOpenAI(base_url=server.api, api_key="unused", max_retries=0) as client:
        with prometheus(target, tmp_path / "prometheus") as prom:
            for _ in range(3):  # traffic across a few 1 s scrapes, for the rates
                await asyncio.gather(
                    *(
                        client.completions.create(model="fake", prompt=f"p {i}", max_tokens=8)
                        for i in range(8)
                    )
                )
                await asyncio.sleep(1)
            values = prom_api(prom, "label/replica/values", **{"match[]": "batcher_queue_depth"})
            assert set(values) == replicas
            by_replica = [p for p in query_panels(dashboard()) if p["title"].endswith("by replica")]
            assert len(by_replica) == 3
            for panel in by_replica:
                result = prom_api(prom, "query", query=expand(panel["targets"][0]["expr"], "5s"))["result"]
                assert {r["metric"].get("replica") for r in result} == replicas, panel["title"]
                print(panel["title"], {r["metric"]["replica"]: r["value"][1] for r in result})


async def _sse(http: httpx.AsyncClient, prompt: str, max_tokens: int, log: dict[str, Any]) -> None:
    """One streaming completion; records its replica, texts, error events and when it ended."""
    body = {"model": "fake", "prompt": prompt, "max_tokens": max_tokens, "stream": True}
    log.update(texts=[], errors=[], done=False)
    async with http.stream("POST", "/v1/completions", json=body) as response:
        log["replica"] = response.headers["x-llm-batcher-replica"]
        async for line in response.aiter_lines():
            if line == "data: [DONE]":
                log["done"] = True
            elif line.startswith("data: "):
                event = json.loads(line[6:])
                if "error" in event:
                    log["errors"].append(event["error"])
                else:
                    log["texts"].append(event["choices"][0]["text"])
                    log.setdefault("first", asyncio.Event()).set()
    log["ended"] = time.monotonic()


async def test_a_replica_killed_mid_stream_ends_its_streams_with_an_error_and_done(server: RayServer) -> None:
    replicas = server.wait_for_replicas(2, timeout=10)
    logs: list[dict[str, Any]] = [{"first": asyncio.Event()} for _ in range(16)]
    prompts = [f"long stream {i}" for i in range(16)]
    async with httpx.AsyncClient(base_url=server.url, timeout=60) as http:
        tasks = [asyncio.create_task(_sse(http, p, 150, log)) for p, log in zip(prompts, logs, strict=True)]
        await asyncio.wait_for(asyncio.gather(*(log["first"].wait() for log in logs)), 30)
        victim = logs[0]["replica"]
        assert {log["replica"] for log in logs} == set(replicas), "the streams did not reach both replicas"
        killed_at = time.monotonic()
        os.kill(replicas[victim], signal.SIGKILL)
        await asyncio.wait_for(asyncio.gather(*tasks), 60)

        for prompt, log in zip(prompts, logs, strict=True):
            assert log["done"], log  # every stream ends with [DONE], never a cut
            if log["replica"] == victim:
                assert [e["code"] for e in log["errors"]] == ["replica_lost"], log["errors"]
                assert log["ended"] - killed_at < 10
                assert expected_text(prompt, 150).startswith("".join(log["texts"]))
            else:
                assert not log["errors"] and "".join(log["texts"]) == expected_text(prompt, 150)
        print(
            "killed replica's streams ended after (s):",
            [round(log["ended"] - killed_at, 2) for log in logs if log["replica"] == victim],
        )

        after = await http.post(
            "/v1/completions", json={"model": "fake", "prompt": "still there?", "max_tokens": 4}
        )
        assert after.status_code == 200 and after.json()["choices"][0]["text"] == expected_text(
            "still there?", 4
        )
    replaced = server.wait_for_replicas(2, timeout=60, exclude={victim})
    print(f"Ray replaced {victim} within {time.monotonic() - killed_at:.1f} s: {sorted(replaced)}")
    assert victim not in replaced
