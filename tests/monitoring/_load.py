"""A bounded load on the example server that gives every outcome of ``batcher_requests_total``.

With the server started by the end-to-end test (fake backend, max_queue 8, max_batch_size 8, a
2 s default deadline): steady streaming clients finish; bursts overflow the queue (429,
overloaded); some streams are dropped after their first chunk (cancelled); ``FAIL`` and ``REJECT``
prompts make the fake backend fail (500) or refuse (400) them; long generations pass the deadline
(504). At most ``MAX_REQUESTS`` requests and ``duration_s`` seconds.
"""

from __future__ import annotations

import asyncio
from collections import Counter
from typing import Any

import httpx

MAX_REQUESTS = 600


class Load:
    def __init__(self, base: str, duration_s: float) -> None:
        self.base = base
        self.duration_s = duration_s
        self.statuses: Counter[str] = Counter()
        self.sent = 0

    def _budget(self) -> bool:
        self.sent += 1
        return self.sent <= MAX_REQUESTS

    async def _complete(self, client: httpx.AsyncClient, prompt: str, max_tokens: int) -> None:
        if not self._budget():
            return
        body = {"model": "fake", "prompt": prompt, "max_tokens": max_tokens}
        r = await client.post("/v1/completions", json=body)
        self.statuses[str(r.status_code)] += 1

    async def _stream(self, client: httpx.AsyncClient, max_tokens: int, *, leave: bool) -> None:
        """A streaming request; ``leave`` drops the connection after the first chunk."""
        if not self._budget():
            return
        body: dict[str, Any] = {
            "model": "fake",
            "prompt": "tell me a story",
            "stream": True,
            "max_tokens": max_tokens,
        }
        async with client.stream("POST", "/v1/completions", json=body) as r:
            async for line in r.aiter_lines():
                if leave and line.startswith("data: "):
                    self.statuses["left"] += 1
                    return
        self.statuses[f"stream {r.status_code}"] += 1
        if r.status_code == 429:  # back off as told (capped), rather than spin on a full queue
            await asyncio.sleep(min(float(r.headers.get("retry-after", 0.2)), 0.5))

    async def _steady(self, client: httpx.AsyncClient, worker: int, stop: asyncio.Event) -> None:
        n = 0
        while not stop.is_set() and self.sent < MAX_REQUESTS:
            n += 1
            await self._stream(client, 4 + (worker * 7 + n) % 20, leave=False)

    async def _specials(self, client: httpx.AsyncClient) -> None:
        """Rounds of: a cancelled stream, a failure, a refusal, a deadline, then a burst past
        max_queue (sent last, so that the others are admitted first)."""
        loop = asyncio.get_running_loop()
        rounds = 8
        for i in range(rounds):
            round_end = loop.time() + self.duration_s / rounds
            first = [self._stream(client, 64, leave=True) for _ in range(2)]
            first += [
                self._complete(client, "this will FAIL", 8),
                self._complete(client, "please REJECT this", 8),
                self._complete(client, "a very long answer", 400),
            ]
            admitted = [asyncio.create_task(w) for w in first]
            await asyncio.sleep(0.1)
            await asyncio.gather(
                *admitted, *(self._complete(client, f"burst {i} {k}", 12) for k in range(24))
            )
            await asyncio.sleep(max(0.0, round_end - loop.time()))  # pace the rounds

    async def run(self) -> Counter[str]:
        limits = httpx.Limits(max_connections=64, max_keepalive_connections=16)
        timeout = httpx.Timeout(30.0)
        async with httpx.AsyncClient(base_url=self.base, limits=limits, timeout=timeout) as client:
            stop = asyncio.Event()
            steady = [asyncio.create_task(self._steady(client, w, stop)) for w in range(4)]
            try:
                await asyncio.wait_for(self._specials(client), self.duration_s + 30)
            finally:
                stop.set()
                await asyncio.gather(*steady)
        return self.statuses
