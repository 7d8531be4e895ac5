"""Properties under random arrivals, cancellations, deadlines and backend faults:

* every request ends exactly once, with one outcome the caller can see;
* no token reaches the wrong request (each stream is a prefix of its own expected tokens);
* the outcome counters add up to the requests submitted, and match what callers saw;
* after close, no task, thread or backend sequence is left.
"""

from __future__ import annotations

import asyncio
import os
import threading
from dataclasses import dataclass

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from batcher import (
    BatchConfig,
    Batcher,
    BatcherClosed,
    DeadlineExceeded,
    InvalidRequest,
    Overloaded,
    RequestFailed,
)
from batcher.backend import SamplingParams
from batcher.testing import FakeBackend


@dataclass(frozen=True)
class Client:
    delay_ms: int
    words: str
    max_tokens: int
    marker: str  # "", "FAIL", "REJECT", "eos:2"
    cancel_after: int | None  # break after this many chunks
    deadline_ms: int | None
    external_cancel_ms: int | None


clients = st.builds(
    Client,
    delay_ms=st.integers(0, 8),
    words=st.text(alphabet="abcdefgh ", min_size=1, max_size=12).filter(str.strip),
    max_tokens=st.integers(1, 12),
    marker=st.sampled_from(["", "", "", "FAIL", "REJECT", "eos:2"]),
    cancel_after=st.none() | st.integers(0, 4),
    deadline_ms=st.none() | st.integers(1, 30),
    external_cancel_ms=st.none() | st.integers(0, 20),
)

EXCEPTION_OUTCOME = {
    Overloaded: "overloaded",
    InvalidRequest: "rejected",
    DeadlineExceeded: "deadline",
    RequestFailed: "failed",
    BatcherClosed: "shutdown",
}


async def run_client(b: Batcher, fb: FakeBackend, c: Client, seen: list[tuple[str, str | None]]) -> None:
    """Run one client; record (what the caller saw, the request's outcome in the batcher)."""
    try:
        await asyncio.sleep(c.delay_ms / 1000)
    except asyncio.CancelledError:
        seen.append(("never sent", None))  # cancelled before it was submitted: not a request
        raise
    prompt = f"{c.words} {c.marker}".strip()
    expected = fb.expected_tokens(prompt, SamplingParams(max_tokens=c.max_tokens))
    got: list[int] = []
    opts = {} if c.deadline_ms is None else {"deadline_s": c.deadline_ms / 1000}
    s = b.stream(prompt, max_tokens=c.max_tokens, **opts)  # type: ignore[arg-type]
    try:
        async with s:
            n = 0
            async for chunk in s:
                got.extend(chunk.token_ids)
                assert got == expected[: len(got)], "a token reached the wrong request"
                n += 1
                if chunk.finish_reason is not None:
                    assert chunk.usage is not None and chunk.usage.completion_tokens == len(got)
                    assert got == expected  # a finished stream is complete
                    seen.append(("finished", s.outcome))
                    return
                if c.cancel_after is not None and n > c.cancel_after:
                    break
        seen.append(("cancelled", s.outcome))
    except asyncio.CancelledError:
        seen.append(("cancelled", s.outcome))
        raise
    except tuple(EXCEPTION_OUTCOME) as e:  # type: ignore[misc]
        saw = next(v for k, v in EXCEPTION_OUTCOME.items() if isinstance(e, k))
        seen.append((saw, s.outcome or saw))  # refused at admission: never had a request


async def scenario(cs: list[Client], faults: list[int], cfg: BatchConfig, drain_s: float) -> None:
    fb = FakeBackend(step_time_s=0.0005)
    seen: list[tuple[str, str | None]] = []
    b = Batcher(fb, cfg)
    async with b:
        tasks = [asyncio.create_task(run_client(b, fb, c, seen)) for c in cs]

        async def canceller(task: asyncio.Task[None], ms: int) -> None:
            await asyncio.sleep(ms / 1000)
            task.cancel()

        extra = [
            asyncio.create_task(canceller(t, c.external_cancel_ms))
            for t, c in zip(tasks, cs, strict=True)
            if c.external_cancel_ms is not None
        ]

        async def fault_injector() -> None:
            for ms in faults:
                await asyncio.sleep(ms / 1000)
                fb.fail_next_steps(1)

        extra.append(asyncio.create_task(fault_injector()))
        async with asyncio.timeout(20):  # every request ends: nothing hangs
            await asyncio.gather(*extra)
            if drain_s:
                await b.aclose(timeout=drain_s)
            results = await asyncio.gather(*tasks, return_exceptions=True)
        for r in results:
            if isinstance(r, BaseException) and not isinstance(r, asyncio.CancelledError):
                raise r
        stats = b.stats()
    # exactly one outcome per request; the counters are the batcher's outcomes, and a caller
    # sees its request's outcome unless it left first (then the request may have ended otherwise
    # just before: finished, failed... while the caller was not reading)
    assert len(seen) == len(cs)
    requests = [(saw, outcome) for saw, outcome in seen if saw != "never sent"]
    assert all(outcome is not None for _, outcome in requests), requests
    assert all(saw == outcome or saw == "cancelled" for saw, outcome in requests), requests
    assert stats.outcomes == {k: sum(1 for _, o in requests if o == k) for k in stats.outcomes}
    # nothing left behind
    assert fb.live_sequences == 0 and fb.closed
    assert [t for t in threading.enumerate() if t.name.startswith("batcher-")] == []
    assert stats.queue_depth == 0 and stats.running == 0
    leftover = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
    assert leftover == []


@settings(
    max_examples=int(os.environ.get("PROPERTY_EXAMPLES", "60")),
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)
@given(
    cs=st.lists(clients, min_size=1, max_size=14),
    faults=st.lists(st.integers(0, 10), max_size=3),
    max_batch_size=st.integers(1, 5),
    max_queue=st.integers(1, 10),
    window_ms=st.sampled_from([0, 0, 2]),
    drain_ms=st.sampled_from([0, 0, 5]),
)
def test_every_request_ends_exactly_once(
    cs: list[Client], faults: list[int], max_batch_size: int, max_queue: int, window_ms: int, drain_ms: int
) -> None:
    cfg = BatchConfig(max_batch_size=max_batch_size, max_queue=max_queue, batch_window_s=window_ms / 1000)
    asyncio.run(scenario(cs, faults, cfg, drain_ms / 1000))
