"""``bench``: sweep the concurrency N through a real :class:`~batcher.Batcher` and fit speedup laws.

Each level N runs a closed loop: N clients, each sending its next request as soon as its last one
ended, all through one Batcher (``max_batch_size`` = the sweep's largest N) on one backend, loaded
once. Per level:

* useful tokens/s: tokens delivered to clients while all N clients were busy, over that time. With
  a request count, that window ends when the first client finds no request left (from then on the
  batch shrinks, which would charge the drain to N); with ``--duration``, at the deadline, where
  the streams still open are cancelled.
* TTFT: from the ``stream()`` call to the first token, every request of the level.
* inter-token latency: the gap between a request's successive deliveries, per token (a delivery
  of k merged tokens counts k gaps of 1/k of it).

Then S(N) = tokens/s(N) / tokens/s(1), fitted by Amdahl's and Gustafson's laws (``_analysis``).
"""

from __future__ import annotations

import asyncio
import dataclasses
import datetime
import json
import math
import os
import platform
import sys
from argparse import Namespace
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TextIO

from batcher import BatchConfig, Batcher, InvalidRequest, Prompt
from batcher.backend import GenerationBackend

from . import _plot
from ._analysis import (
    Fit,
    LevelSummary,
    Recommendation,
    amdahl,
    fit_amdahl,
    fit_gustafson,
    gustafson,
    percentiles,
    recommend,
)
from ._setup import BENCH_PROMPTS, make_backend, progress_bar, prompts

__all__ = ["Level", "concurrency_levels", "measure_level", "run_bench"]

STEM = "bench_speedup"


@dataclass(slots=True)
class _Trace:
    """One request as its client saw it: when it was sent, when each delivery came, its size."""

    start: float
    times: list[float] = field(default_factory=list)
    counts: list[int] = field(default_factory=list)

    def itl(self) -> list[float]:
        gaps: list[float] = []
        for prev, t, k in zip(self.times, self.times[1:], self.counts[1:], strict=False):
            gaps += [(t - prev) / k] * k
        return gaps


@dataclass(frozen=True, slots=True, kw_only=True)
class Level:
    """The figures of one concurrency level (latencies in seconds)."""

    n: int
    requests: int
    tokens: int
    window_s: float
    ttft_s: dict[str, float]
    itl_s: dict[str, float]

    @property
    def tokens_per_s(self) -> float:
        return self.tokens / self.window_s if self.window_s > 0 else 0.0

    def summary(self) -> LevelSummary:
        return LevelSummary(self.n, self.tokens_per_s, self.ttft_s, self.itl_s)


def concurrency_levels(max_batch_size: int) -> list[int]:
    """1, 2, 4 ... up to ``max_batch_size``, which is always the last level."""
    ns = [1]
    while ns[-1] * 2 < max_batch_size:
        ns.append(ns[-1] * 2)
    return ns if ns[-1] == max_batch_size else [*ns, max_batch_size]


async def measure_level(
    batcher: Batcher,
    n: int,
    prompts: Sequence[Prompt],
    *,
    max_tokens: int,
    requests: int | None,
    duration_s: float | None,
    on_request_done: Callable[[], object] = lambda: None,
) -> Level:
    """Run N closed-loop clients for ``requests`` requests (or ``duration_s`` seconds)."""
    loop = asyncio.get_running_loop()
    traces: list[_Trace] = []
    idle_at: list[float] = []
    sent = 0

    async def client() -> None:
        nonlocal sent
        while duration_s is not None or (requests is not None and sent < requests):
            trace = _Trace(loop.time())
            traces.append(trace)
            prompt = prompts[sent % len(prompts)]
            sent += 1
            async with batcher.stream(prompt, max_tokens=max_tokens) as stream:
                async for chunk in stream:
                    if chunk.token_ids:
                        trace.times.append(loop.time())
                        trace.counts.append(len(chunk.token_ids))
            on_request_done()
        idle_at.append(loop.time())

    t0 = loop.time()
    clients = asyncio.gather(*(client() for _ in range(n)))
    if duration_s is None:
        await clients
        window = min(idle_at) - t0
    else:
        try:
            await asyncio.wait_for(clients, duration_s)
        except TimeoutError:
            pass  # the clients were cancelled, and with them their open streams
        window = duration_s
    end = t0 + window
    tokens = sum(k for tr in traces for t, k in zip(tr.times, tr.counts, strict=True) if t <= end)
    return Level(
        n=n,
        requests=len(traces),
        tokens=tokens,
        window_s=window,
        ttft_s=percentiles([tr.times[0] - tr.start for tr in traces if tr.times]),
        itl_s=percentiles([gap for tr in traces for gap in tr.itl()]),
    )


async def _sweep(
    backend: GenerationBackend, prompts: Sequence[Prompt], args: Namespace, out: TextIO
) -> list[Level]:
    config = BatchConfig(max_batch_size=args.max_batch_size, max_queue=max(256, 2 * args.max_batch_size))
    levels: list[Level] = []
    async with Batcher(backend, config) as batcher:
        await batcher.generate(prompts[0], max_tokens=min(4, args.max_tokens))  # warm-up, not measured
        for n in concurrency_levels(args.max_batch_size):
            requests = None if args.duration else args.requests_per_level or max(8, 3 * n)
            with progress_bar(total=requests, desc=f"N={n}", unit="req", leave=False) as bar:
                level = await measure_level(
                    batcher,
                    n,
                    prompts,
                    max_tokens=args.max_tokens,
                    requests=requests,
                    duration_s=args.duration,
                    on_request_done=bar.update,
                )
            levels.append(level)
            base = levels[0].tokens_per_s
            print(_row(level, level.tokens_per_s / base if base else math.nan), file=out, flush=True)
    return levels


_HEADER = (
    f"{'N':>4} {'reqs':>5} {'tok/s':>9} {'S(N)':>6} | "
    f"{'TTFT p50':>9} {'p90':>7} {'p99':>7} ms | {'ITL p50':>8} {'p90':>7} {'p99':>7} ms"
)


def _row(level: Level, speedup: float) -> str:
    t, i = level.ttft_s, level.itl_s
    return (
        f"{level.n:>4} {level.requests:>5} {level.tokens_per_s:>9.1f} {speedup:>6.2f} | "
        f"{t['p50'] * 1e3:>9.1f} {t['p90'] * 1e3:>7.1f} {t['p99'] * 1e3:>7.1f}    | "
        f"{i['p50'] * 1e3:>8.1f} {i['p90'] * 1e3:>7.1f} {i['p99'] * 1e3:>7.1f}"
    )


def _fit_lines(amd: Fit, gus: Fit) -> list[str]:
    return [
        f"Amdahl fit:    P = {amd.p:.4f} (serial fraction {amd.serial:.4f}), speedup ceiling "
        f"1/(1-P) = {amd.max_speedup:.1f}x, RMSE {amd.rmse:.3f}",
        f"Gustafson fit: P = {gus.p:.4f} (serial fraction {gus.serial:.4f}), "
        f"S(N) = N - (1-P)(N-1), RMSE {gus.rmse:.3f}",
    ]


def _load_average() -> tuple[float, float, float] | None:
    return os.getloadavg() if hasattr(os, "getloadavg") else None


def _machine(load_at_start: tuple[float, float, float] | None) -> dict[str, Any]:
    """The CPU, the OpenMP settings, and the 1/5/15-minute load averages at the start and end of
    the run: on a shared machine every figure is noisy, and these say how noisy."""
    model = ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {
        "cpus": os.cpu_count(),
        "cpu": model or platform.processor(),
        "load_average_start": load_at_start,
        "load_average_end": _load_average(),
        "omp": {k: os.environ.get(k) for k in ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT", "OMP_NUM_THREADS")},
    }


def _report(
    args: Namespace,
    load_at_start: tuple[float, float, float] | None,
    backend: Any,
    prompts: int,
    levels: list[Level],
    fits: tuple[Fit, Fit],
    advice: Recommendation | None,
) -> dict[str, Any]:
    base = levels[0].tokens_per_s
    amd, gus = fits
    return {
        "tool": "llm-batcher bench",
        "created": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "model": getattr(backend, "model_name", args.model),
        "device": args.device,
        "dtype": str(backend.dtype).removeprefix("torch.") if hasattr(backend, "dtype") else None,
        "max_batch_size": args.max_batch_size,
        "max_tokens": args.max_tokens,
        "prompts": prompts,
        "mode": {"requests_per_level": args.requests_per_level, "duration_s": args.duration},
        "machine": _machine(load_at_start),
        "levels": [
            {
                **dataclasses.asdict(lv),
                "tokens_per_s": lv.tokens_per_s,
                "speedup": lv.tokens_per_s / base,
                "amdahl_speedup": amdahl(lv.n, amd.p),
                "gustafson_speedup": gustafson(lv.n, gus.p),
            }
            for lv in levels
        ],
        "amdahl": {"p": amd.p, "serial": amd.serial, "max_speedup": amd.max_speedup, "rmse": amd.rmse},
        "gustafson": {"p": gus.p, "serial": gus.serial, "rmse": gus.rmse},
        "slo": {"ttft_s": args.slo_ttft, "itl_s": args.slo_itl, "percentile": args.slo_percentile},
        "recommendation": None if advice is None else dataclasses.asdict(advice),
    }


def _finite(value: Any) -> Any:
    """``value`` with every infinite or NaN float replaced by None (JSON has neither)."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_finite(v) for v in value]
    return value


def run_bench(args: Namespace, out: TextIO = sys.stdout) -> int:
    """The ``bench`` command: returns its exit status."""
    if args.requests_per_level is not None and args.requests_per_level < args.max_batch_size:
        print(
            f"--requests-per-level {args.requests_per_level} is below the largest concurrency "
            f"{args.max_batch_size}: give at least that many",
            file=sys.stderr,
        )
        return 2
    work = prompts(args.prompts, BENCH_PROMPTS, chat=not args.completion)
    backend = make_backend(args)
    print(_HEADER, file=out, flush=True)
    load_at_start = _load_average()
    levels = asyncio.run(_sweep(backend, work, args, out))
    if not levels[0].tokens:
        raise InvalidRequest(
            f"N=1 delivered no token within its window ({levels[0].window_s:g} s): give a longer --duration",
            field="duration",
        )
    speedups = [lv.tokens_per_s / levels[0].tokens_per_s for lv in levels]
    ns = [lv.n for lv in levels]
    fits = fit_amdahl(ns, speedups), fit_gustafson(ns, speedups)
    advice = None
    if args.slo_ttft is not None or args.slo_itl is not None:
        advice = recommend(
            [lv.summary() for lv in levels], ttft_s=args.slo_ttft, itl_s=args.slo_itl, pct=args.slo_percentile
        )
    report = _report(args, load_at_start, backend, len(work), levels, fits, advice)
    folder = Path(args.out)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / f"{STEM}.json").write_text(json.dumps(_finite(report), indent=2, allow_nan=False) + "\n")
    _plot.plot(folder / f"{STEM}.png", report)
    for line in _fit_lines(*fits):
        print(line, file=out)
    if advice is not None:
        print(("recommended: " if advice.max_batch_size else "no recommendation: ") + advice.reason, file=out)
    print(f"wrote {folder / STEM}.json and {folder / STEM}.png", file=out)
    return 0
