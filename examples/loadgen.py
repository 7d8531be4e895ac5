"""Load generator for the OpenAI-compatible server: closed-loop concurrency or open-loop Poisson.

    python examples/loadgen.py --concurrency 32 --requests 256
    python examples/loadgen.py --rate 8 --requests 200 --max-tokens 64 --chat
    python examples/loadgen.py --prompts my_prompts.txt --out run.png --json run.json

Every request streams (``stream_options.include_usage``), so time to first token is measured at
the first token that arrives. While it runs a progress bar shows completed requests; at the end it
prints a table (output tokens/s, requests/s, TTFT and end-to-end latency p50/p90/p99, errors by
status) and writes a PNG (latency CDFs and throughput over time).

Bounded on purpose: at most ``--requests`` requests (≤ 100000) and ``--duration`` seconds (after
which it stops sending and cancels what is in flight). It talks only to loopback addresses unless
``--allow-remote`` is given.
"""

from __future__ import annotations

import argparse
import asyncio
import ipaddress
import json
import math
import os
import random
import sys
import time
from collections import Counter
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import httpx
from tqdm import tqdm

DEFAULT_PROMPTS = (
    "Once upon a time, in a small village by the sea,",
    "The three most important things to know about Python are",
    "Write a haiku about autumn leaves.",
    "Explain in one paragraph why the sky is blue.",
    "The capital of France is",
    "List five fruits that are red:",
    "A good name for a cat that likes to sleep is",
    "def fibonacci(n):",
    "The history of the printing press begins",
    "Translate to French: 'Where is the train station?'",
    "Give three tips for writing clear documentation.",
    "In 2050, cities will",
)
MAX_REQUESTS = 100_000


@dataclass
class Result:
    start: float  # seconds since the run began
    status: int | str  # HTTP status, or "connect", "timeout", "stream_error", "cancelled"
    ttft: float | None = None
    e2e: float | None = None
    tokens: int = 0

    @property
    def ok(self) -> bool:
        return self.status == 200


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--url", default="http://127.0.0.1:8000", help="server base URL")
    mode = p.add_mutually_exclusive_group()
    mode.add_argument("--concurrency", type=int, default=None, help="closed loop: requests in flight")
    mode.add_argument("--rate", type=float, default=None, help="open loop: Poisson arrivals per second")
    p.add_argument("--requests", type=int, default=100, help=f"requests to send (≤ {MAX_REQUESTS})")
    p.add_argument("--duration", type=float, default=300.0, help="hard time limit, seconds")
    p.add_argument("--max-tokens", type=int, default=64)
    p.add_argument("--temperature", type=float, default=0.0)
    p.add_argument("--chat", action="store_true", help="use /v1/chat/completions")
    p.add_argument("--prompts", type=Path, help="one prompt per line (or JSONL with a 'prompt' key)")
    p.add_argument("--model", default=None, help="model id to send (default: omitted: the served model)")
    p.add_argument(
        "--api-key",
        default=os.environ.get("LLM_BATCHER_API_KEY"),
        help="bearer key (default: $LLM_BATCHER_API_KEY; argv is visible in ps)",
    )
    p.add_argument("--timeout", type=float, default=120.0, help="per-request timeout, seconds")
    p.add_argument("--seed", type=int, default=0, help="prompt order and Poisson arrivals")
    p.add_argument("--out", type=Path, default=Path("loadgen.png"), help="PNG plot path")
    p.add_argument("--json", type=Path, default=None, help="also write the summary as JSON")
    p.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    p.add_argument("--allow-remote", action="store_true", help="allow a non-loopback --url")
    args = p.parse_args(argv)
    if not 1 <= args.requests <= MAX_REQUESTS:
        p.error(f"--requests must be in [1, {MAX_REQUESTS}]")
    if not 0 < args.duration <= 24 * 3600:
        p.error("--duration must be in (0, 86400] seconds")
    if args.concurrency is None and args.rate is None:
        args.concurrency = 8
    if args.concurrency is not None and args.concurrency < 1:
        p.error("--concurrency must be >= 1")
    if args.rate is not None and not (0 < args.rate <= 10_000):
        p.error("--rate must be in (0, 10000]")
    if not args.allow_remote and not is_loopback(args.url):
        p.error(f"{args.url} is not a loopback address: pass --allow-remote to load it anyway")
    return args


def is_loopback(url: str) -> bool:
    host = urlsplit(url).hostname or ""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def load_prompts(path: Path | None) -> list[str]:
    if path is None:
        return list(DEFAULT_PROMPTS)
    prompts = []
    for line in path.read_text(encoding="utf-8").splitlines():
        line = line.strip()
        if not line:
            continue
        if line.startswith("{"):
            line = json.loads(line)["prompt"]
        prompts.append(line)
    if not prompts:
        raise SystemExit(f"{path} holds no prompts")
    return prompts


class Runner:
    def __init__(self, args: argparse.Namespace, prompts: list[str]) -> None:
        self.args = args
        self.prompts = prompts
        self.rng = random.Random(args.seed)
        self.results: list[Result] = []
        self.t0 = 0.0
        headers = {"Authorization": f"Bearer {args.api_key}"} if args.api_key else {}
        limit = args.concurrency or 1024
        self.client = httpx.AsyncClient(
            base_url=args.url,
            headers=headers,
            timeout=httpx.Timeout(args.timeout),
            limits=httpx.Limits(max_connections=limit, max_keepalive_connections=limit),
        )
        self.bar = tqdm(total=args.requests, unit="req", disable=args.no_progress, file=sys.stderr)

    def body(self, i: int) -> tuple[str, dict[str, Any]]:
        prompt = self.prompts[i % len(self.prompts)]
        body: dict[str, Any] = {
            "max_tokens": self.args.max_tokens,
            "temperature": self.args.temperature,
            "stream": True,
            "stream_options": {"include_usage": True},
        }
        if self.args.model is not None:
            body["model"] = self.args.model
        if self.args.chat:
            return "/v1/chat/completions", body | {"messages": [{"role": "user", "content": prompt}]}
        return "/v1/completions", body | {"prompt": prompt}

    async def one(self, i: int) -> None:
        path, body = self.body(i)
        start = time.perf_counter()
        r = Result(start=start - self.t0, status="cancelled")
        try:
            async with self.client.stream("POST", path, json=body) as resp:
                r.status = resp.status_code
                if resp.status_code == 200:
                    await self._read(resp, r, start)
                else:
                    await resp.aread()
        except httpx.TimeoutException:
            r.status = "timeout"
        except httpx.TransportError:
            r.status = "connect"
        finally:
            self.results.append(r)
            self.bar.update(1)

    async def _read(self, resp: httpx.Response, r: Result, start: float) -> None:
        pieces = 0
        async for line in resp.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            event = json.loads(line[6:])
            if "error" in event:
                r.status = "stream_error"
                return
            if event.get("usage"):
                r.tokens = event["usage"]["completion_tokens"]
            for choice in event.get("choices", ()):
                text = choice.get("text") or choice.get("delta", {}).get("content")
                if text:
                    pieces += 1
                    if r.ttft is None:
                        r.ttft = time.perf_counter() - start
        r.e2e = time.perf_counter() - start
        r.tokens = r.tokens or pieces

    async def run(self) -> float:
        self.t0 = time.perf_counter()
        try:
            async with asyncio.timeout(self.args.duration):
                if self.args.rate is not None:
                    await self._open_loop()
                else:
                    await self._closed_loop()
        except TimeoutError:
            print(f"\nstopped at the --duration limit ({self.args.duration:g} s)", file=sys.stderr)
        finally:
            self.bar.close()
            await self.client.aclose()
        return time.perf_counter() - self.t0

    async def _closed_loop(self) -> None:
        counter = iter(range(self.args.requests))

        async def worker() -> None:
            for i in counter:
                await self.one(i)

        async with asyncio.TaskGroup() as tg:
            for _ in range(min(self.args.concurrency, self.args.requests)):
                tg.create_task(worker())

    async def _open_loop(self) -> None:
        async with asyncio.TaskGroup() as tg:
            for i in range(self.args.requests):
                tg.create_task(self.one(i))
                await asyncio.sleep(self.rng.expovariate(self.args.rate))


def percentile(values: list[float], q: float) -> float:
    if not values:
        return math.nan
    s = sorted(values)
    k = (len(s) - 1) * q
    lo, hi = math.floor(k), math.ceil(k)
    return s[lo] + (s[hi] - s[lo]) * (k - lo)


def summarize(results: list[Result], wall: float) -> dict[str, Any]:
    ok = [r for r in results if r.ok]
    ttft = [r.ttft for r in ok if r.ttft is not None]
    e2e = [r.e2e for r in ok if r.e2e is not None]
    tokens = sum(r.tokens for r in ok)
    errors = Counter(str(r.status) for r in results if not r.ok)
    summary: dict[str, Any] = {
        "requests": len(results),
        "ok": len(ok),
        "wall_s": wall,
        "output_tokens": tokens,
        "tokens_per_s": tokens / wall if wall else 0.0,
        "requests_per_s": len(ok) / wall if wall else 0.0,
        "errors": dict(sorted(errors.items())),
    }
    for name, values in (("ttft", ttft), ("e2e", e2e)):
        for q in (50, 90, 99):
            summary[f"{name}_p{q}_s"] = percentile(values, q / 100)
    return summary


def table(summary: dict[str, Any]) -> str:
    def ms(key: str) -> str:
        v = summary[key]
        return "—" if math.isnan(v) else f"{v * 1000:9.1f} ms"

    rows = [
        ("requests (ok/total)", f"{summary['ok']}/{summary['requests']}"),
        ("wall time", f"{summary['wall_s']:.2f} s"),
        ("output tokens", f"{summary['output_tokens']}"),
        ("output tokens/s", f"{summary['tokens_per_s']:.1f}"),
        ("requests/s", f"{summary['requests_per_s']:.2f}"),
        ("", "  ".join(f"{q:>12}" for q in ("p50", "p90", "p99"))),
        ("TTFT", "  ".join(ms(f"ttft_p{q}_s") for q in (50, 90, 99))),
        ("end-to-end", "  ".join(ms(f"e2e_p{q}_s") for q in (50, 90, 99))),
    ]
    errors = summary["errors"]
    rows.append(("errors by status", ", ".join(f"{k}: {v}" for k, v in errors.items()) or "none"))
    width = max(len(k) for k, _ in rows)
    return "\n".join(f"{k:<{width}}  {v}" for k, v in rows)


def plot(results: list[Result], summary: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ok = [r for r in results if r.ok and r.e2e is not None]
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4))
    for name, values in (
        ("TTFT", [r.ttft for r in ok if r.ttft is not None]),
        ("end-to-end", [r.e2e for r in ok]),
    ):
        xs = sorted(v for v in values if v is not None)
        if xs:
            left.plot(xs, [(i + 1) / len(xs) for i in range(len(xs))], label=name)
    left.set(xlabel="latency (s)", ylabel="fraction of requests", title="Latency CDF")
    left.grid(alpha=0.3)
    left.legend()
    # Throughput over time: each request's tokens spread evenly over its lifetime, 1 s bins.
    span = max((r.start + (r.e2e or 0) for r in ok), default=1.0)
    bins = [0.0] * (int(span) + 1)
    for r in ok:
        end = r.start + (r.e2e or 0)
        for b in range(int(r.start), int(end) + 1):
            overlap = min(end, b + 1) - max(r.start, b)
            if overlap > 0 and r.e2e:
                bins[b] += r.tokens * overlap / r.e2e
    right.plot(range(len(bins)), bins)
    right.set(
        xlabel="time (s)",
        ylabel="output tokens/s",
        title=f"Throughput (mean {summary['tokens_per_s']:.0f} tok/s)",
    )
    right.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    runner = Runner(args, load_prompts(args.prompts))
    wall = asyncio.run(runner.run())
    summary = summarize(runner.results, wall)
    print(table(summary))
    plot(runner.results, summary, args.out)
    print(f"plot: {args.out}")
    if args.json is not None:
        args.json.write_text(json.dumps(summary | {"results": [asdict(r) for r in runner.results]}, indent=1))
    return 0 if summary["ok"] == summary["requests"] else 1


if __name__ == "__main__":
    sys.exit(main())
