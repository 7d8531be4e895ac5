"""The prefix cache of the HF backend (issue 14), cache on against cache off, on this machine.

Three measurements, each run with ``prefix_cache`` on and off, interleaved (on, off, off, on, ...)
so that a neighbour's load drifts over both alike; the medians over rounds are reported:

* **Poisson**: ``bench_hf.workload`` prompts, each with the same ~400-token system prompt, arriving
  at ``--rate`` requests/s: TTFT p50 (issue 14's target: at most 0.07 s in fp32 with the cache).
* **closed loop**: the same prompts, ``--concurrency`` clients: throughput in generated tokens/s
  (the cache must not make it lower).
* **a 20-turn chat**: each turn is the previous conversation, the model's answer and a new
  question: per-turn TTFT, flat with the cache, growing with the history without it.

The machine may be shared: figures are noisy; the A/B is interleaved for that reason.

    .venv/bin/python benchmarks/bench_prefix.py [--rounds 2] [--poisson-prompts 16] [--settings on]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).parent))

from batcher.adapters.hf._backend import HFBackend
from bench_hf import Req, batcher_serve, closed_loop, figures, poisson, workload

from batcher import BatchConfig, Batcher

SYSTEM_PARAGRAPH = (
    "You are the support assistant of Northwind Outfitters, a shop that sells hiking, camping and "
    "climbing gear online and in three stores. Always answer politely and precisely. Never invent "
    "prices, stock levels or delivery dates: if you do not know, say so and point the customer to "
    "the order page. Orders ship within two working days; returns are accepted for thirty days "
    "with the receipt, except for opened food and fuel canisters. Repairs of tents and backpacks "
    "are free during the first year. Keep answers short unless the customer asks for details. "
)
QUESTIONS = [
    "What is your return policy for boots?",
    "Can you repair a tent I bought last spring?",
    "How long does shipping take?",
    "Do you sell fuel canisters?",
    "Which backpack would you recommend for a weekend hike?",
]


def system_prompt(backend: HFBackend, tokens: int) -> str:
    """About ``tokens`` tokens of system prompt (whole sentences of the paragraph above)."""
    words: list[str] = []
    sentences = [s.strip() + "." for s in SYSTEM_PARAGRAPH.split(".") if s.strip()]
    i = 0
    while len(backend.tokenizer(" ".join(words))["input_ids"]) < tokens:
        words.append(f"Rule {i + 1}: {sentences[i % len(sentences)]}")
        i += 1
    return " ".join(words)


def with_system(reqs: list[Req], system: str) -> list[Req]:
    return [Req([{"role": "system", "content": system}, *r.messages], r.max_tokens) for r in reqs]


async def run_load(backend: HFBackend, args: argparse.Namespace, reqs: list[Req]) -> dict[str, Any]:
    """One phase: warm up, Poisson arrivals, then the closed loop, on a fresh start (cold cache)."""
    async with Batcher(backend, BatchConfig(max_batch_size=args.concurrency)) as batcher:
        serve = batcher_serve(batcher)
        await serve(Req(reqs[-1].messages, 2))  # warm up (and, with the cache, the system prompt)
        stats = batcher.engine_stats()[0].stats
        obs, wall = await poisson(serve, reqs[: args.poisson_prompts], args.rate, "poisson")
        p = figures("batcher", "poisson", obs, wall)
        p_interrupts, steps = stats.interrupted_steps, stats.steps
        obs, wall = await closed_loop(serve, reqs[: args.prompts], args.concurrency, "closed")
        c = figures("batcher", "closed", obs, wall)
        c_interrupts = stats.interrupted_steps - p_interrupts
    cache = backend.prefix_stats
    return {
        "ttft_p50": p.ttft_p50,
        "ttft_p99": p.ttft_p99,
        "closed_tok_s": c.tokens_per_s,
        "closed_ttft_p50": c.ttft_p50,
        "hit_ratio": cache.hit_ratio,
        "evictions": cache.evictions,
        "poisson_interrupts": p_interrupts,
        "poisson_steps": steps,
        "closed_interrupts": c_interrupts,
    }


async def run_chat(backend: HFBackend, system: str, turns: int, max_tokens: int) -> list[tuple[int, float]]:
    """A ``turns``-turn chat, one turn at a time: (prompt tokens, TTFT) per turn."""
    out: list[tuple[int, float]] = []
    async with Batcher(backend, BatchConfig(max_batch_size=4)) as batcher:
        messages: list[dict[str, str]] = [{"role": "system", "content": system}]
        for t in range(turns):
            messages.append({"role": "user", "content": QUESTIONS[t % len(QUESTIONS)]})
            t0, ttft, text = time.perf_counter(), 0.0, ""
            async with batcher.stream(messages, max_tokens=max_tokens) as stream:
                async for chunk in stream:
                    if chunk.token_ids and not ttft:
                        ttft = time.perf_counter() - t0
                    text += chunk.text
            out.append((len(backend.tokenize(messages)), ttft))
            print(f"  chat turn {t + 1:2d}: {out[-1][0]:5d} prompt tokens, TTFT {ttft:.3f} s", flush=True)
            messages.append({"role": "assistant", "content": text})
    return out


async def main(args: argparse.Namespace) -> None:
    backends = {
        "on": HFBackend(dtype=args.dtype, prefix_cache=True),
        "off": HFBackend(dtype=args.dtype, prefix_cache=False),
    }
    system = system_prompt(backends["on"], args.system_tokens)
    reqs = with_system(workload(max(args.prompts, args.poisson_prompts) + 1), system)
    print(
        f"dtype={args.dtype} torch threads={os.cpu_count()} load average={os.getloadavg()} "
        f"system prompt={len(backends['on'].tokenize(reqs[0].messages[:1]))} tokens "
        f"rate={args.rate}/s poisson prompts={args.poisson_prompts} closed prompts={args.prompts} "
        f"c={args.concurrency} rounds={args.rounds}",
        flush=True,
    )
    settings = args.settings.split(",")
    runs: dict[str, list[dict[str, Any]]] = {name: [] for name in settings}
    order = (settings + settings[::-1]) * args.rounds
    for name in order[: len(settings) * args.rounds]:
        r = await run_load(backends[name], args, reqs)
        runs[name].append(r)
        print(f"{name:>3}: " + " ".join(f"{k}={v:.3f}" for k, v in r.items()), flush=True)
    med = {name: {k: statistics.median(r[k] for r in rs) for k in rs[0]} for name, rs in runs.items() if rs}
    print("medians:", json.dumps(med, indent=1))
    if not args.turns:
        save(Path(args.out), {"runs": runs, "medians": med})
        return
    chats = {}
    for name in ("on", "off"):
        print(f"chat, cache {name}:", flush=True)
        chats[name] = await run_chat(backends[name], system, args.turns, args.chat_tokens)
    print("20-turn chat, TTFT per turn (prompt tokens: cache on s / cache off s):")
    for t, ((n, on), (_, off)) in enumerate(zip(chats["on"], chats["off"], strict=True)):
        print(f"  turn {t + 1:2d}  {n:5d} tokens  on {on:.3f}  off {off:.3f}")
    save(Path(args.out), {"runs": runs, "medians": med, "chat": chats})


def save(out: Path, data: dict[str, Any]) -> None:
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(data, indent=1))


def parse() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32")
    p.add_argument("--rounds", type=int, default=2, help="runs per setting, interleaved")
    p.add_argument("--settings", default="on,off", help="cache settings to run: on,off | on | off")
    p.add_argument("--rate", type=float, default=0.5)
    p.add_argument("--poisson-prompts", type=int, default=24)
    p.add_argument("--prompts", type=int, default=32, help="closed loop prompts")
    p.add_argument("--concurrency", type=int, default=32)
    p.add_argument("--system-tokens", type=int, default=400)
    p.add_argument("--turns", type=int, default=20)
    p.add_argument("--chat-tokens", type=int, default=32)
    p.add_argument("--out", default="out/bench_prefix.json")
    return p.parse_args()


if __name__ == "__main__":
    asyncio.run(main(parse()))
