"""Issue 13's proof on the real SmolLM2: four clients posting ~1 MB chat prompts move a normal
client's time to first token (p50) by less than 20 %.

The normal client's requests alternate between the two conditions (alone, then during the flood,
then alone...), so drift in the machine's load falls on both; each side's median is over 20
requests. The flood runs in a process of its own, started once, with pre-encoded bodies: in threads of the
measuring process its sending took the GIL from the measuring client and tripled the figure, and
a process started per sample added its start-up to the figure.

Each flooding client posts 4 huge prompts a second (16 MB/s in all). In the issue each client got
its 400 after about 2 s, so the four sent about 2 a second; 16 a second is 8 times that. A closed
loop of instant 400s (some 800 posts and 800 MB a second over loopback) measures how the test's
own senders saturate a 2-core machine, not whether tokenizing serialises requests.
"""

from __future__ import annotations

import asyncio
import json
import os
import statistics
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import openai
import pytest

from .conftest import Server, start_server

pytestmark = [pytest.mark.model, pytest.mark.slow]
MODEL = "SmolLM2-135M-Instruct"
SAMPLES = 20
POST_EVERY_S = 0.25  # per flooding client
HUGE = "The sea was calm and the ship sailed on into the night. " * 18_000  # ~1 MB

FLOOD = """
import sys, threading, time, httpx
url, path, pace = sys.argv[1], sys.argv[2], float(sys.argv[3])
body = open(path, "rb").read()
lock, on = threading.Lock(), threading.Event()
def run():
    with httpx.Client(base_url=url, timeout=60) as http:
        while on.wait():
            due = time.monotonic() + pace
            r = http.post("/v1/chat/completions", content=body, headers={"content-type": "application/json"})
            with lock:
                print(r.status_code, flush=True)
            time.sleep(max(0.0, due - time.monotonic()))
for _ in range(4):
    threading.Thread(target=run, daemon=True).start()
for line in sys.stdin:  # "on" / "off"; end of input ends the flood
    on.set() if line.strip() == "on" else on.clear()
"""


@pytest.fixture(scope="module")
def real_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    pytest.importorskip("torch")
    s = start_server(tmp_path_factory.mktemp("real-flood"), "--dtype", "float32", ready_timeout=240)
    yield s
    assert s.stop() == 0, s.output()[-3000:]


class Flood:
    """Four clients posting the huge prompt, in a process of their own, while switched on."""

    def __init__(self, url: str, body: Path) -> None:
        args = [sys.executable, "-c", FLOOD, url, str(body), str(POST_EVERY_S)]
        self.proc = subprocess.Popen(args, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        self.statuses: list[int] = []
        self.posted = threading.Event()  # set at each answered post
        self.reader = threading.Thread(target=self._read)
        self.reader.start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self.statuses.append(int(line))
            self.posted.set()

    async def switch(self, on: bool) -> None:
        """Switch the flood on (returning once a post was answered: it runs) or off."""
        assert self.proc.stdin is not None
        self.posted.clear()
        self.proc.stdin.write("on\n" if on else "off\n")
        self.proc.stdin.flush()
        if on:
            assert await asyncio.to_thread(self.posted.wait, 30)

    def close(self) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.close()
        self.proc.wait(30)
        self.reader.join(30)
        assert self.proc.stdout is not None
        self.proc.stdout.close()


async def ttft(client: openai.AsyncOpenAI, i: int) -> float:
    start = time.perf_counter()
    stream = await client.chat.completions.create(
        model=MODEL,
        messages=[{"role": "user", "content": f"Say a number: {i}"}],
        max_tokens=2,
        temperature=0,
        stream=True,
    )
    first = None
    async for chunk in stream:
        if first is None and chunk.choices and chunk.choices[0].delta.content:
            first = time.perf_counter() - start
    assert first is not None
    return first


@pytest.mark.timed
@pytest.mark.usefixtures("frozen_heap")
async def test_huge_prompts_do_not_slow_a_normal_clients_first_token(
    real_server: Server, tmp_path: Path
) -> None:
    assert len(HUGE) > 1_000_000
    body = tmp_path / "huge.json"
    body.write_bytes(json.dumps({"model": MODEL, "messages": [{"role": "user", "content": HUGE}]}).encode())
    async with openai.AsyncOpenAI(base_url=real_server.api, api_key="x", max_retries=0, timeout=60) as client:
        for i in range(3):
            await ttft(client, i)  # warm up
        alone: list[float] = []
        flooded: list[float] = []
        flood = Flood(real_server.url, body)
        try:
            for i in range(2 * SAMPLES):
                if i % 2:
                    await flood.switch(on=True)
                    flooded.append(await ttft(client, i))
                    await flood.switch(on=False)
                else:
                    alone.append(await ttft(client, i))
        finally:
            flood.close()
        statuses = flood.statuses
    p50_alone, p50_flooded = statistics.median(alone), statistics.median(flooded)
    print(
        f"\nTTFT p50 alone {p50_alone * 1000:.1f} ms, during the flood {p50_flooded * 1000:.1f} ms "
        f"(x{p50_flooded / p50_alone:.2f}); {len(statuses)} huge posts, answered {sorted(set(statuses))}"
    )
    assert set(statuses) == {400} and len(statuses) >= SAMPLES
    samples = f"alone {ms(alone)}, flooded {ms(flooded)}; load average {os.getloadavg()}"
    assert p50_flooded < 1.2 * p50_alone, samples


def ms(seconds: list[float]) -> list[int]:
    return sorted(round(s * 1000) for s in seconds)
