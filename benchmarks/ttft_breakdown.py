"""Where a cache-hit newcomer's time to first token goes (issue 14), on the HF backend.

The workload of ``bench_prefix.py`` (a ~400-token system prompt on every prompt, Poisson arrivals
at ``--rate``), served with the prefix cache on, with the backend's verbs and the step's phases
timed on their own threads (``time.perf_counter``; on the CPU every torch call is synchronous):

    arrival ─► host thread starts prepare ─► prepare (tokenize, cache peek) ─► queued
      ─► the step running then ends ─► its own step starts (loop: plan, hand-off)
      ─► own step: drop/plan, forward (the uncached suffix + the decode rows), store to the cache,
         sampling and the rest ─► the loop delivers ─► the client's first chunk

For each request the phases add up to its TTFT exactly; the p50 of each phase is printed, with
the p50 TTFT, the uncached tokens per newcomer and the rows its step decoded. Last, the floor the
matrix products alone set: the model's own linear layers (as a step calls them) timed at the
median own step's positions. No scheduling brings the TTFT below it. (The wait for the step
running at arrival is mostly gone: a newcomer interrupts a decode step where that pays,
``HFBackend.interrupt``.)

    .venv/bin/python benchmarks/ttft_breakdown.py [--prompts 16] [--rate 0.5]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import random
import statistics
import sys
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).parent))

import batcher.adapters.hf._backend as hf_backend
from batcher.adapters.hf._backend import HFBackend
from bench_hf import Req, workload
from bench_prefix import system_prompt, with_system

from batcher import BatchConfig, Batcher

PHASES = (
    "to host thread",
    "prepare",
    "running step",
    "loop to step",
    "step: plan",
    "step: forward",
    "step: store",
    "step: sample",
    "step: other",
    "delivery",
)


@dataclass
class StepTimes:
    start: float
    end: float = 0.0
    parts: dict[str, float] = field(default_factory=dict)
    rows: int = 0
    new_tokens: int = 0
    interrupted: bool = False


@dataclass
class Trace:
    """Timestamps of one request, keyed by its prompt's token ids."""

    arrival: float = 0.0
    prepare_start: float = 0.0
    prepare_end: float = 0.0
    step: StepTimes | None = None
    running: StepTimes | None = None  # the step running when it was queued
    first_chunk: float = 0.0
    uncached: int = 0


class Probe:
    """Wraps an HFBackend's verbs and step phases with timers (benchmark only)."""

    def __init__(self, backend: HFBackend) -> None:
        self.backend = backend
        self.traces: dict[tuple[int, ...], Trace] = {}
        self.steps: list[StepTimes] = []
        self.current: StepTimes | None = None
        self.lock = threading.Lock()
        self._wrap_verbs()
        self._wrap_phases()

    def _wrap_verbs(self) -> None:
        be, prepare, step = self.backend, self.backend.prepare, self.backend.step

        def timed_prepare(requests: Sequence[Any]) -> Any:
            t0 = time.perf_counter()
            out = prepare(requests)
            t1 = time.perf_counter()
            with self.lock:
                for p in out:
                    ids = tuple(getattr(p, "token_ids", ()))
                    if ids in self.traces:
                        tr = self.traces[ids]
                        tr.prepare_start, tr.prepare_end = t0, t1
                        tr.running = self.current
                        tr.uncached = len(ids) - p.cached_tokens
            return out

        def timed_step(admit: Sequence[Any], drop: Sequence[int]) -> Any:
            st = StepTimes(time.perf_counter())
            with self.lock:
                self.current = st
            out = step(admit, drop)
            st.end = time.perf_counter()
            st.rows = be.live_sequences
            st.new_tokens = out.computed_tokens
            st.interrupted = out.interrupted
            with self.lock:
                self.current = None
                self.steps.append(st)
                for a in admit:
                    tr = self.traces.get(tuple(a.prompt_ids))
                    if tr is not None and tr.step is None:
                        tr.step = st
            return out

        be.prepare = timed_prepare  # type: ignore[method-assign]
        be.step = timed_step  # type: ignore[method-assign]

    def _wrap_phases(self) -> None:
        be = self.backend

        def timed(name: str, fn: Callable[..., Any]) -> Callable[..., Any]:
            def run(*args: Any, **kw: Any) -> Any:
                t0 = time.perf_counter()
                try:
                    return fn(*args, **kw)
                finally:
                    st = self.current
                    if st is not None:
                        st.parts[name] = st.parts.get(name, 0.0) + time.perf_counter() - t0

            return run

        be._plan = timed("step: plan", be._plan)  # type: ignore[method-assign]
        be._forward = timed("step: forward", be._forward)  # type: ignore[method-assign]
        be._store_rows = timed("step: store", be._store_rows)  # type: ignore[method-assign]
        hf_backend.sample = timed("step: sample", hf_backend.sample)

    def expect(self, ids: Sequence[int], arrival: float) -> Trace:
        tr = self.traces[tuple(ids)] = Trace(arrival=arrival)
        return tr


def phases(tr: Trace) -> dict[str, float]:
    """One request's TTFT, cut into the phases of the module doc (they sum to the TTFT)."""
    st = tr.step
    assert st is not None
    waited = tr.running.end if tr.running is not None and tr.running is not st else tr.prepare_end
    waited = min(max(waited, tr.prepare_end), st.start)
    own = {k: st.parts.get(k, 0.0) for k in PHASES if k.startswith("step: ") and k != "step: other"}
    return {
        "to host thread": tr.prepare_start - tr.arrival,
        "prepare": tr.prepare_end - tr.prepare_start,
        "running step": waited - tr.prepare_end,
        "loop to step": st.start - waited,
        **own,
        "step: other": (st.end - st.start) - sum(own.values()),
        "delivery": tr.first_chunk - st.end,
    }


async def run(args: argparse.Namespace) -> None:
    backend = HFBackend(dtype=args.dtype, prefix_cache=True)
    probe = Probe(backend)
    system = system_prompt(backend, args.system_tokens)
    reqs = with_system(workload(args.prompts + 1), system)
    config = BatchConfig(max_batch_size=args.concurrency)
    rng = random.Random(7)
    done: list[Trace] = []
    async with Batcher(backend, config) as batcher:
        await batcher.generate(reqs[-1].messages, max_tokens=2)  # warm: the system prompt's blocks
        model = backend.model  # kept for the floor, timed once the device thread has exited

        async def one(r: Req) -> None:
            tr = probe.expect(backend.tokenize(r.messages), time.perf_counter())
            async with batcher.stream(r.messages, max_tokens=r.max_tokens) as stream:
                async for chunk in stream:
                    if chunk.token_ids and not tr.first_chunk:
                        tr.first_chunk = time.perf_counter()
            done.append(tr)

        tasks = []
        for r in reqs[: args.prompts]:
            tasks.append(asyncio.create_task(one(r)))
            await asyncio.sleep(rng.expovariate(args.rate))
        await asyncio.gather(*tasks)
    rows = [phases(tr) for tr in done if tr.step is not None]
    ttfts = [tr.first_chunk - tr.arrival for tr in done]
    print(
        f"dtype={args.dtype} load average={os.getloadavg()} requests={len(rows)} rate={args.rate}/s "
        f"hit ratio={backend.prefix_stats.hit_ratio:.3f}"
    )
    print(f"TTFT p50 {statistics.median(ttfts):.4f} s  (mean {statistics.fmean(ttfts):.4f} s)")
    for name in PHASES:
        ms = [r[name] * 1e3 for r in rows]
        print(f"  {name:16s} p50 {statistics.median(ms):8.1f} ms   mean {statistics.fmean(ms):8.1f} ms")
    print(
        f"  own step: uncached prompt tokens p50 {statistics.median(t.uncached for t in done)}, "
        f"rows p50 {statistics.median(t.step.rows for t in done if t.step)}"
    )
    decode = [s.end - s.start for s in probe.steps if s.new_tokens == s.rows]
    if decode:
        print(f"  decode-only steps: {len(decode)}, p50 {statistics.median(decode) * 1e3:.1f} ms")
    own = [t.step for t in done if t.step is not None]
    positions, rows_own = (
        int(statistics.median(s.new_tokens for s in own)),
        int(statistics.median(s.rows for s in own)),
    )
    interrupted = sum(s.interrupted for s in probe.steps)
    own_ms = products_ms(model, backend.dtype, positions, rows_own)
    print(
        f"  decode steps a newcomer interrupted: {interrupted} (for {len(done)} arrivals; the others "
        "came while a step admitted, or too late in one for stopping it to pay)"
    )
    print(
        f"floor of the matrix products alone: own step ({positions} positions, {rows_own} rows) "
        f"{own_ms:.1f} ms"
    )


def products_ms(model: Any, dtype: torch.dtype, positions: int, rows: int, repeats: int = 7) -> float:
    """Median milliseconds of one pass over the model's linear layers as a step calls them:
    ``[1, positions, features]`` through every layer (one product for fused siblings), then
    ``[1, rows, hidden]`` through the output head (logits for each row's last token only)."""
    head = model.get_output_embeddings()
    layers = [m for m in model.modules() if hasattr(m, "in_features") and m is not head]
    inputs: list[torch.Tensor] = []
    for m in layers:  # fused siblings (``_cpu_linear.Fused``: q/k/v, gate/up) share their input
        shared = getattr(m, "fused", None) is not None and getattr(m, "index", 0) > 0
        inputs.append(inputs[-1] if shared else torch.randn(1, positions, m.in_features, dtype=dtype))
    last = torch.randn(1, rows, head.in_features, dtype=dtype)
    times = []
    with torch.inference_mode():
        for _ in range(repeats):
            t0 = time.perf_counter()
            for m, x in zip(layers, inputs, strict=True):
                m(x)
            head(last)
            times.append(time.perf_counter() - t0)
    return statistics.median(times[1:]) * 1e3


def parse() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32")
    p.add_argument("--rate", type=float, default=0.5)
    p.add_argument("--prompts", type=int, default=16)
    p.add_argument("--concurrency", type=int, default=32)
    p.add_argument("--system-tokens", type=int, default=400)
    return p.parse_args()


if __name__ == "__main__":
    asyncio.run(run(parse()))
