"""Core benchmarks: the batcher's own overhead, and its batching efficiency. Prints figures.

    .venv/bin/python benchmarks/bench_core.py [--loop uvloop|asyncio] [--seconds 3] [--pin-cpu N]

(a) Overhead with a zero-cost backend (32 concurrent callers):
    one-shot ``infer`` requests/s; one-token streaming requests/s; per-token delivery cost with 32
    concurrent 64-token streams; latency the middleware adds to a lone request (p50/p99). A bare
    20-line ``asyncio.Queue`` batcher runs in the same process for scale.
(b) Batching efficiency: FakeBackend with step time ``a + b*B`` at saturation (more callers than
    slots): achieved tokens/s as a fraction of the ideal ``B / (a + b*B)``.

Not a test: figures depend on the machine. Targets (issue 2): >= 150k one-shot req/s,
>= 50k one-token streaming req/s, <= 5 us per delivered token, >= 95% batching efficiency.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import time
from collections.abc import Awaitable, Callable
from typing import Any

from batcher import BatchConfig, Batcher, InvalidRequest
from batcher.backend import NewSequence, PreparedPrompt, PrepareRequest, SeqOutput, StepResult
from batcher.testing import FakeBackend

CALLERS = 32


class NullBackend:
    """A zero-cost generation backend: the least Python a backend can do per token, so the figures
    are the batcher's own cost (the FakeBackend's tokenizer and stop matching would add theirs)."""

    model_name = "null"

    def __init__(self) -> None:
        self._left: dict[int, int] = {}
        self._prompt = PreparedPrompt((1, 2, 3))

    def start(self) -> None:
        pass

    def prepare(self, requests: list[PrepareRequest]) -> list[PreparedPrompt | InvalidRequest]:
        return [self._prompt] * len(requests)

    def step(self, admit: list[NewSequence], drop: list[int]) -> StepResult:
        left = self._left
        for i in drop:
            left.pop(i, None)
        for new in admit:
            left[new.seq_id] = new.params.max_tokens
        out = []
        for i, n in list(left.items()):
            if n == 1:
                del left[i]
                out.append(SeqOutput(i, (7,), " x", "length"))
            else:
                left[i] = n - 1
                out.append(SeqOutput(i, (7,), " x"))
        return StepResult(out)

    def close(self) -> None:
        self._left.clear()


def identity(xs: list[Any]) -> list[Any]:
    return xs


async def closed_loop(call: Callable[[int], Awaitable[Any]], seconds: float, callers: int = CALLERS) -> float:
    """Requests/s with ``callers`` tasks each calling ``call`` back to back for ``seconds``."""
    loop = asyncio.get_running_loop()
    end = loop.time() + seconds
    done = 0

    async def caller(i: int) -> None:
        nonlocal done
        while loop.time() < end:
            await call(i)
            done += 1

    t0 = time.perf_counter()
    await asyncio.gather(*(caller(i) for i in range(callers)))
    return done / (time.perf_counter() - t0)


async def bare_queue_batcher(seconds: float) -> float:
    """The 20-line baseline: an asyncio.Queue, a collector task, a no-op batch, no threads."""
    q: asyncio.Queue[tuple[int, asyncio.Future[int]]] = asyncio.Queue()

    async def worker() -> None:
        while True:
            batch = [await q.get()]
            while not q.empty() and len(batch) < CALLERS:
                batch.append(q.get_nowait())
            for x, fut in batch:
                fut.set_result(x)

    task = asyncio.create_task(worker())
    loop = asyncio.get_running_loop()

    async def call(i: int) -> int:
        fut = loop.create_future()
        q.put_nowait((i, fut))
        return await fut

    rate = await closed_loop(call, seconds)
    task.cancel()
    return rate


async def one_shot(seconds: float) -> float:
    async with Batcher(
        identity, BatchConfig(max_batch_size=CALLERS, batch_window_s=0, max_queue=4 * CALLERS)
    ) as b:
        return await closed_loop(b.infer, seconds)


async def one_token_streams(seconds: float) -> float:
    async with Batcher(
        NullBackend(), BatchConfig(max_batch_size=CALLERS, batch_window_s=0, max_queue=4 * CALLERS)
    ) as b:

        async def call(i: int) -> None:
            async for _ in b.stream("hi", max_tokens=1):
                pass

        return await closed_loop(call, seconds)


async def per_token_cost(rounds: int = 20) -> tuple[float, float]:
    """Microseconds per delivered token with 32 concurrent 64-token streams; and steps/s."""
    async with Batcher(NullBackend(), BatchConfig(max_batch_size=CALLERS, batch_window_s=0)) as b:

        async def consume(i: int) -> int:
            n = 0
            async for c in b.stream(f"stream {i}", max_tokens=64):
                n += len(c.token_ids)
            return n

        best = float("inf")
        for _ in range(rounds):
            t0 = time.perf_counter()
            tokens = sum(await asyncio.gather(*(consume(i) for i in range(CALLERS))))
            best = min(best, (time.perf_counter() - t0) / tokens)
        steps = b.stats().steps
    return best * 1e6, steps / rounds


async def added_latency(n: int = 2000) -> tuple[float, float, float, float]:
    """p50/p99 (us) of a lone request through the batcher: one-shot infer, and generate(1 token)."""
    out = []
    async with Batcher(identity, BatchConfig(batch_window_s=0)) as b:
        lat = []
        for i in range(n):
            t0 = time.perf_counter()
            await b.infer(i)
            lat.append(time.perf_counter() - t0)
        out += [_pct(lat, 50), _pct(lat, 99)]
    async with Batcher(NullBackend(), BatchConfig(batch_window_s=0)) as b:
        lat = []
        for _ in range(n):
            t0 = time.perf_counter()
            await b.generate("hi", max_tokens=1)
            lat.append(time.perf_counter() - t0)
        out += [_pct(lat, 50), _pct(lat, 99)]
    return out[0], out[1], out[2], out[3]


def _pct(xs: list[float], p: float) -> float:
    return statistics.quantiles(xs, n=100)[int(p) - 1] * 1e6


async def efficiency(a: float, b_: float, size: int, seconds: float) -> tuple[float, float, float]:
    """(achieved tokens/s, ideal tokens/s, mean batch) at saturation with step time a + b*B.

    2B callers keep the queue full; tokens are counted only inside a window that starts after a
    warm-up and ends before callers stop (the drain tail, where the batch empties, is excluded).
    """
    fb = FakeBackend(step_time_s=a, step_time_per_seq_s=b_, max_context=1 << 20)
    cfg = BatchConfig(max_batch_size=size, batch_window_s=0, max_queue=4 * size)
    async with Batcher(fb, cfg) as bt:
        stop = False
        tokens = 0
        counting = False

        async def caller(i: int) -> None:
            nonlocal tokens
            k = 0
            while not stop:
                async for c in bt.stream(f"client {i} request {k}", max_tokens=16 + (i * 7 + k) % 48):
                    if counting:
                        tokens += len(c.token_ids)
                k += 1

        tasks = [asyncio.create_task(caller(i)) for i in range(2 * size)]
        await asyncio.sleep(0.5 + 20 * a)  # warm up: the batch fills
        steps0, counting, t0 = len(fb.batch_sizes), True, time.perf_counter()
        await asyncio.sleep(seconds)
        counting, elapsed, steps1 = False, time.perf_counter() - t0, len(fb.batch_sizes)
        stop = True
        await asyncio.gather(*tasks)
    sizes = fb.batch_sizes[steps0:steps1]
    return tokens / elapsed, size / (a + b_ * size), sum(sizes) / len(sizes)


async def main(seconds: float) -> None:
    print(f"event loop: {type(asyncio.get_running_loop()).__module__}, {CALLERS} concurrent callers\n")
    base = await bare_queue_batcher(seconds)
    print(f"{'bare asyncio.Queue batcher (no threads, for scale)':<58} {base:>12,.0f} req/s")
    r = await one_shot(seconds)
    print(f"{'one-shot infer (no-op batch fn, device thread)':<58} {r:>12,.0f} req/s   target >= 150,000")
    r = await one_token_streams(seconds)
    print(f"{'one-token streaming requests':<58} {r:>12,.0f} req/s   target >= 50,000")
    us, _steps = await per_token_cost()
    print(f"{'per delivered token, 32 x 64-token streams':<58} {us:>12.2f} us      target <= 5")
    p50, p99, g50, g99 = await added_latency()
    print(f"{'added latency, lone infer            p50 / p99':<58} {p50:>7.0f} / {p99:.0f} us")
    print(f"{'added latency, lone 1-token generate p50 / p99':<58} {g50:>7.0f} / {g99:.0f} us")
    print("\nbatching efficiency at saturation (FakeBackend, step = a + b*B, 2B closed-loop callers)")
    print(
        f"{'a (ms)':>7} {'b (ms)':>7} {'B':>4} {'achieved tok/s':>15} {'ideal tok/s':>12} "
        f"{'mean B':>7} {'efficiency':>11}"
    )
    for a, b_, size in ((0.010, 0.0005, 32), (0.040, 0.003, 32), (0.005, 0.0002, 8)):
        got, ideal, mean = await efficiency(a, b_, size, max(seconds, 3.0))
        print(
            f"{a * 1e3:>7.1f} {b_ * 1e3:>7.2f} {size:>4} {got:>15,.0f} {ideal:>12,.0f} "
            f"{mean:>7.1f} {got / ideal:>10.1%}   target >= 95%"
        )


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--loop", choices=["uvloop", "asyncio"], default="uvloop")
    ap.add_argument("--seconds", type=float, default=3.0)
    ap.add_argument(
        "--pin-cpu",
        type=int,
        metavar="N",
        help="diagnostic: run every thread on CPU N, so no hand-off has to wake a sleeping CPU "
        "(on a VM without halt polling each such wake-up costs tens of microseconds)",
    )
    args = ap.parse_args()
    if args.pin_cpu is not None:
        os.sched_setaffinity(0, {args.pin_cpu})  # before any thread exists: they all inherit it
        print(f"diagnostic run: every thread pinned to CPU {args.pin_cpu}")
    if args.loop == "uvloop":
        import uvloop

        uvloop.run(main(args.seconds))
    else:
        asyncio.run(main(args.seconds))
