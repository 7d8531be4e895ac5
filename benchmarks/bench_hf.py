"""Benchmark: Batcher + HFBackend against the simple ways of serving a transformers model.

Workload (fixed, seeded): chat prompts that invite long answers, ``max_tokens`` drawn in 16..128,
greedy decoding, on the embedded SmolLM2-135M-Instruct. Two arrival patterns:

* closed loop: ``--concurrency`` (32) clients, each sends its next prompt when the last ends;
* Poisson: requests arrive at ``--rate`` (0.5) per second, whatever the server's state.

Systems:

* ``batcher``      our Batcher + HFBackend (continuous batching on the KV slab);
                   the baselines below run plain transformers (a separate, unmodified copy);
* ``sequential``   one ``model.generate`` at a time (an asyncio lock around a worker thread);
* ``threads``      thread per request: ``asyncio.to_thread(model.generate)`` on the default pool;
* ``static``       static batching: wait ``--window`` s (or for 32 requests), run one padded
                   ``generate`` of the batch to its longest member, answer everyone at its end
                   (TTFT = when the batch's first token is out);
* ``ceiling``      raw ceiling: one padded ``generate`` of a full batch of 32 prompts for 128
                   tokens, counting every computed token (no EOS, no waste accounting).

The slow baselines (sequential, threads) run on the first ``--baseline-prompts`` prompts (16 by
default) so that a whole run stays under ~10 minutes per dtype; tokens/s are comparable, latency
percentiles are over their own subset. Useful tokens = generated tokens delivered to clients
(EOS included, as ``generate`` counts it).

One OpenMP team at a time. Every thread that runs a parallel torch op gets its own libgomp team,
and once a process holds more libgomp threads than CPUs, libgomp stops spinning between parallel
regions for *all* teams: every region then wakes a sleeping thread (measured here: a linear layer
25 % slower while a second, idle team merely exists; the batcher's closed loop 208-221 -> 150-186
tok/s after one lone ``generate`` ran on another thread). So the batcher is measured first, with
only its device thread's team alive, and closed before the baselines, which all run on one
dedicated thread (one team); thread-per-request, which makes a team per pool thread by its very
nature, runs last. The lone-request comparison measures each side in its own phase.

Offline mode (``--offline N``, the GPU comparison): all N prompts submitted at once, in one
process, on the same prompts: ours (after a closed loop at ``--concurrency``), static batching
(``generate`` on chunks of ``--max-batch`` run to their longest), the padded ceiling
(``--max-batch`` x 128), and transformers' continuous batching (``init_continuous_batching``, one
``add_request`` per prompt with its own ``max_new_tokens``; run last, it re-wires attention). It
also prints the "ops per step per layer" figure (``batcher.adapters.hf._opcount``): attention calls,
``copy_`` and indexed writes per layer while 1, 7, 24 then 64 newcomers join a running batch.
``--device cuda``, ``--model DIR``, and ``--random-weights`` (SmolLM2's config and tokenizer with
random weights: the same cost per token, no embedded model needed; ``--tokenizer DIR`` names a
folder with SmolLM2's config and tokenizer files where the embedded model is not installed).

Prints a table, writes ``results-<tag>.json`` and ``bench_hf-<tag>.png`` to ``--out``.
Usage::

    python benchmarks/bench_hf.py --dtype float32 [--quick] [--out out/bench_hf]
    python benchmarks/bench_hf.py --offline 64 --max-batch 64          # CPU, a few minutes
    python benchmarks/bench_hf.py --device cuda --dtype bfloat16 --random-weights --offline 512 \
        --max-batch 256
"""

from __future__ import annotations

import batcher.adapters.hf  # noqa: F401  (first: it sets OpenMP's wait policy before torch loads)

# isort: split
# OpenMP's wait policy: the HF backend's own (a bounded spin, see adapters/hf/_threads.py) unless
# OMP_WAIT_POLICY or GOMP_SPINCOUNT is set before Python starts. The values are printed.
import argparse
import asyncio
import concurrent.futures
import json
import os
import random
import statistics
import tempfile
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from batcher.adapters.hf._backend import HFBackend
from batcher.adapters.hf._load import embedded_model_dir
from batcher.adapters.hf._opcount import StepOps, wave_ops
from tqdm import tqdm

from batcher import BatchConfig, Batcher

TOPICS = [
    "the history of the Roman Empire",
    "how volcanoes form",
    "the life cycle of stars",
    "why people dream",
    "the invention of the printing press",
    "how the internet works",
    "the water cycle",
    "the causes of the French Revolution",
    "how vaccines train the immune system",
    "the migration of monarch butterflies",
    "photosynthesis",
    "the rise of artificial intelligence",
    "the building of the pyramids",
    "how airplanes fly",
    "the ocean's deepest trenches",
    "the discovery of penicillin",
]
TEMPLATES = [
    "Write a detailed essay about {t}.",
    "Explain {t} step by step, with examples, to a curious student.",
    "Tell me a long story that involves {t}.",
    "Give a thorough lecture on {t}, covering everything important.",
]


@dataclass
class Req:
    messages: list[dict[str, str]]
    max_tokens: int


@dataclass
class Obs:
    ttft: float
    e2e: float
    tokens: int


@dataclass
class Figures:
    system: str
    pattern: str
    requests: int
    useful_tokens: int
    wall_s: float
    tokens_per_s: float
    ttft_p50: float
    ttft_p99: float
    e2e_p50: float
    e2e_p99: float
    extra: dict[str, Any] = field(default_factory=dict)


def workload(n: int, seed: int = 1234) -> list[Req]:
    rng = random.Random(seed)
    out = []
    for i in range(n):
        text = TEMPLATES[i % len(TEMPLATES)].format(t=TOPICS[(i * 7 + i // 16) % len(TOPICS)])
        out.append(Req([{"role": "user", "content": text}], rng.randint(16, 128)))
    return out


def pct(xs: Sequence[float], p: float) -> float:
    if not xs:
        return float("nan")
    s = sorted(xs)
    return s[min(len(s) - 1, max(0, round(p / 100 * (len(s) - 1))))]


def figures(system: str, pattern: str, obs: list[Obs], wall: float, **extra: Any) -> Figures:
    toks = sum(o.tokens for o in obs)
    return Figures(
        system,
        pattern,
        len(obs),
        toks,
        wall,
        toks / wall,
        pct([o.ttft for o in obs], 50),
        pct([o.ttft for o in obs], 99),
        pct([o.e2e for o in obs], 50),
        pct([o.e2e for o in obs], 99),
        extra,
    )


# -- arrival patterns ------------------------------------------------------------------------------
Serve = Callable[[Req], Awaitable[Obs]]


async def closed_loop(serve: Serve, reqs: list[Req], concurrency: int, desc: str) -> tuple[list[Obs], float]:
    queue = list(reversed(reqs))
    obs: list[Obs] = []
    bar = tqdm(total=len(reqs), desc=desc, leave=False)

    async def client() -> None:
        while queue:
            r = queue.pop()
            obs.append(await serve(r))
            bar.update()

    t0 = time.perf_counter()
    await asyncio.gather(*(client() for _ in range(concurrency)))
    bar.close()
    return obs, time.perf_counter() - t0


async def poisson(
    serve: Serve, reqs: list[Req], rate: float, desc: str, seed: int = 7
) -> tuple[list[Obs], float]:
    rng = random.Random(seed)
    bar = tqdm(total=len(reqs), desc=desc, leave=False)
    tasks = []

    async def one(r: Req) -> Obs:
        o = await serve(r)
        bar.update()
        return o

    t0 = time.perf_counter()
    for r in reqs:
        tasks.append(asyncio.create_task(one(r)))
        await asyncio.sleep(rng.expovariate(rate))
    obs = list(await asyncio.gather(*tasks))
    bar.close()
    return obs, time.perf_counter() - t0


# -- systems --------------------------------------------------------------------------------------
def batcher_serve(batcher: Batcher) -> Serve:
    async def serve(r: Req) -> Obs:
        t0 = time.perf_counter()
        ttft = None
        n = 0
        async with batcher.stream(r.messages, max_tokens=r.max_tokens) as stream:
            async for chunk in stream:
                if chunk.token_ids and ttft is None:
                    ttft = time.perf_counter() - t0
                n += len(chunk.token_ids)
        return Obs(ttft or 0.0, time.perf_counter() - t0, n)

    return serve


class _FirstToken:
    """A generate() streamer that notes when the first generated token comes out."""

    def __init__(self) -> None:
        self.calls = 0
        self.at: float | None = None

    def put(self, value: Any) -> None:
        self.calls += 1
        if self.calls == 2 and self.at is None:  # the first put() is the prompt
            self.at = time.perf_counter()

    def end(self) -> None:
        pass


class Generator:
    """Plain ``model.generate`` on a plain transformers copy of the model (the baselines: no
    packed weights, no KV slab: what one gets without this project)."""

    def __init__(self, backend: HFBackend) -> None:
        from transformers import AutoModelForCausalLM

        model = AutoModelForCausalLM.from_pretrained(backend._source, **backend._load_kw, dtype=backend.dtype)
        self.model = model.to(backend.device).eval()
        self.device = backend.device
        # The one thread the sequential, static and ceiling baselines run on (one OpenMP team).
        self.thread = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="baseline")
        self.tok = backend.tokenizer
        self.pad = backend.tokenizer.pad_token_id
        self.ids: dict[str, list[int]] = {}

    def encode(self, r: Req) -> list[int]:
        key = r.messages[0]["content"]
        if key not in self.ids:
            text = self.tok.apply_chat_template(r.messages, add_generation_prompt=True, tokenize=False)
            self.ids[key] = self.tok(text, add_special_tokens=False)["input_ids"]
        return self.ids[key]

    def generate(
        self, prompts: list[list[int]], max_new: int, streamer: Any = None, min_new: int = 0
    ) -> list[list[int]]:
        width = max(len(p) for p in prompts)
        ids = torch.tensor([[self.pad] * (width - len(p)) + p for p in prompts], device=self.device)
        mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts], device=self.device)
        with torch.inference_mode():
            out = self.model.generate(
                input_ids=ids,
                attention_mask=mask,
                max_new_tokens=max_new,
                min_new_tokens=min_new,
                do_sample=False,
                pad_token_id=self.pad,
                streamer=streamer,
            )
        return [row[width:].tolist() for row in out]

    def useful(self, tokens: list[int], max_tokens: int) -> int:
        """Tokens a client would get: up to its max_tokens, up to and including EOS."""
        tokens = tokens[:max_tokens]
        eos = self.model.generation_config.eos_token_id
        eos = {eos} if isinstance(eos, int) else set(eos or ())
        for i, t in enumerate(tokens):
            if t in eos:
                return i + 1
        return len(tokens)

    def one(self, r: Req) -> Obs:
        t0 = time.perf_counter()
        s = _FirstToken()
        [toks] = self.generate([self.encode(r)], r.max_tokens, s)
        end = time.perf_counter()
        return Obs((s.at or end) - t0, end - t0, self.useful(toks, r.max_tokens))


def sequential_serve(gen: Generator) -> Serve:
    lock = asyncio.Lock()

    async def serve(r: Req) -> Obs:
        t0 = time.perf_counter()
        async with lock:
            o = await asyncio.get_running_loop().run_in_executor(gen.thread, gen.one, r)
        return Obs(o.ttft + (time.perf_counter() - t0 - o.e2e), time.perf_counter() - t0, o.tokens)

    return serve


def threads_serve(gen: Generator) -> Serve:
    async def serve(r: Req) -> Obs:
        t0 = time.perf_counter()
        o = await asyncio.to_thread(gen.one, r)
        return Obs(o.ttft + (time.perf_counter() - t0 - o.e2e), time.perf_counter() - t0, o.tokens)

    return serve


class StaticBatcher:
    """Collect requests for ``window`` s (or until ``size``), then generate them as one batch."""

    def __init__(self, gen: Generator, window: float, size: int = 32) -> None:
        self.gen, self.window, self.size = gen, window, size
        self.pending: list[tuple[Req, asyncio.Future[tuple[float, float, int]]]] = []
        self.lock = asyncio.Lock()
        self.timer: asyncio.TimerHandle | None = None
        self.kick = asyncio.Event()
        self.task: asyncio.Task[None] | None = None

    async def run(self) -> None:
        while True:
            await self.kick.wait()
            self.kick.clear()
            await asyncio.sleep(self.window)
            batch, self.pending = self.pending[: self.size], self.pending[self.size :]
            if self.pending:
                self.kick.set()
            if not batch:
                continue
            prompts = [self.gen.encode(r) for r, _ in batch]
            longest = max(r.max_tokens for r, _ in batch)
            s = _FirstToken()
            loop = asyncio.get_running_loop()
            outs = await loop.run_in_executor(self.gen.thread, self.gen.generate, prompts, longest, s)
            for (r, fut), toks in zip(batch, outs, strict=True):
                end = time.perf_counter()
                fut.set_result((s.at or end, end, self.gen.useful(toks, r.max_tokens)))

    async def serve(self, r: Req) -> Obs:
        if self.task is None:
            self.task = asyncio.create_task(self.run())
        t0 = time.perf_counter()
        fut: asyncio.Future[tuple[float, float, int]] = asyncio.get_running_loop().create_future()
        self.pending.append((r, fut))
        self.kick.set()
        first, end, n = await fut
        return Obs(first - t0, end - t0, n)

    async def close(self) -> None:
        if self.task is not None:
            self.task.cancel()
            try:
                await self.task
            except asyncio.CancelledError:
                pass


def ceiling(gen: Generator, reqs: list[Req], batch: int) -> Figures:
    prompts = [gen.encode(r) for r in reqs[:batch]]
    t0 = time.perf_counter()
    s = _FirstToken()
    outs = gen.generate(prompts, 128, s, min_new=128)
    wall = time.perf_counter() - t0
    computed = sum(len(o) for o in outs)
    return Figures(
        "ceiling",
        "one batch",
        batch,
        computed,
        wall,
        computed / wall,
        (s.at or t0) - t0,
        (s.at or t0) - t0,
        wall,
        wall,
    )


async def lone_ttft_ours(batcher: Batcher, req: Req, repeats: int) -> float:
    """Median first-token time of one short request alone in the batcher."""
    serve = batcher_serve(batcher)
    return statistics.median([(await serve(Req(req.messages, 4))).ttft for _ in range(repeats)])


async def lone_ttft_theirs(gen: Generator, req: Req, repeats: int) -> float:
    """Median first-token time of the same request through a lone ``generate``."""
    loop = asyncio.get_running_loop()
    short = Req(req.messages, 4)
    return statistics.median(
        [(await loop.run_in_executor(gen.thread, gen.one, short)).ttft for _ in range(repeats)]
    )


# -- offline: every prompt submitted at once (--offline N) ------------------------------------------
def static_offline(gen: Generator, reqs: list[Req], batch: int) -> Figures:
    """Static batching: ``generate`` on chunks of ``batch`` prompts, each run to its longest member."""
    obs: list[Obs] = []
    t0 = time.perf_counter()
    for i in range(0, len(reqs), batch):
        chunk = reqs[i : i + batch]
        s = _FirstToken()
        outs = gen.generate([gen.encode(r) for r in chunk], max(r.max_tokens for r in chunk), s)
        end = time.perf_counter()
        obs += [
            Obs((s.at or end) - t0, end - t0, gen.useful(o, r.max_tokens))
            for o, r in zip(outs, chunk, strict=True)
        ]
    return figures("static", f"offline {len(reqs)}", obs, time.perf_counter() - t0, batch=batch)


def hf_continuous(gen: Generator, reqs: list[Req]) -> Figures:
    """transformers' own continuous batching: ``init_continuous_batching`` then one ``add_request``
    per prompt (its own max_new_tokens), results collected as they finish. Run last: it switches
    the model to its paged attention."""
    from transformers import GenerationConfig

    eos = gen.model.generation_config.eos_token_id
    config = GenerationConfig(
        max_new_tokens=max(r.max_tokens for r in reqs),
        do_sample=False,
        pad_token_id=gen.pad,
        eos_token_id=eos,
    )
    manager = gen.model.init_continuous_batching(generation_config=config)
    manager.start()
    obs: list[Obs] = []
    try:
        t0 = time.perf_counter()
        for i, r in enumerate(reqs):
            manager.add_request(
                gen.encode(r), request_id=f"r{i}", max_new_tokens=r.max_tokens, record_timestamps=True
            )
        while len(obs) < len(reqs):
            out = manager.get_result(timeout=1.0)
            if out is None:
                if not manager.is_running():
                    raise RuntimeError("transformers' continuous batching stopped before finishing")
                continue
            if out.is_finished():
                end = time.perf_counter()
                first = out.timestamps[0] if out.timestamps else end
                obs.append(
                    Obs(
                        first - t0,
                        end - t0,
                        gen.useful(out.generated_tokens, reqs[int(out.request_id[1:])].max_tokens),
                    )
                )
        wall = time.perf_counter() - t0
    finally:
        manager.stop(block=True)
    return figures("hf-cb", f"offline {len(reqs)}", obs, wall)


async def offline_ours(batcher: Batcher, reqs: list[Req]) -> Figures:
    serve = batcher_serve(batcher)
    t0 = time.perf_counter()
    obs = list(await asyncio.gather(*(serve(r) for r in reqs)))
    return figures("batcher", f"offline {len(reqs)}", obs, time.perf_counter() - t0)


def step_ops(backend: HFBackend) -> list[StepOps]:
    """The ops-per-step-per-layer figure: 1, 7, 24 then 64 newcomers join a running batch."""
    backend.start()
    try:
        return wave_ops(backend, backend.model.config.get_text_config().num_hidden_layers)
    finally:
        backend.close()


def random_model_dir(args: argparse.Namespace) -> str:
    """A random-weight model with SmolLM2's config and tokenizer (from ``--tokenizer``, else the
    embedded model's folder), saved once in the temporary folder: it costs the same per token as the
    real one."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    src = args.tokenizer or str(embedded_model_dir())
    path = Path(tempfile.gettempdir()) / "llm-batcher-random-smollm2"
    if not (path / "config.json").exists():
        config = AutoConfig.from_pretrained(src)
        torch.manual_seed(0)
        AutoModelForCausalLM.from_config(config, dtype=torch.float32).save_pretrained(str(path))
        AutoTokenizer.from_pretrained(src).save_pretrained(str(path))
    return str(path)


async def main_offline(args: argparse.Namespace, backend: HFBackend) -> tuple[list[Figures], dict[str, Any]]:
    """Ours (closed loop, then offline), static batching, the padded ceiling, transformers'
    continuous batching, all on the same prompts in one process; and the ops figure."""
    n = args.offline
    reqs = workload(max(n, args.prompts, args.max_batch))
    extra: dict[str, Any] = {"ops": [asdict(o) for o in step_ops(backend)]}
    results: list[Figures] = []
    config = BatchConfig(max_batch_size=args.max_batch, max_queue=max(256, n))
    async with Batcher(backend, config) as batcher:
        serve = batcher_serve(batcher)
        await serve(Req(reqs[0].messages, 2))  # warm up
        ours = await lone_ttft_ours(batcher, reqs[1], 3)
        obs, wall = await closed_loop(serve, reqs[: args.prompts], args.concurrency, "batcher closed")
        results.append(figures("batcher", f"closed c={args.concurrency}", obs, wall))
        note(results[-1])
        results.append(await offline_ours(batcher, reqs[:n]))
        note(results[-1])
    if args.only_batcher:
        return results, extra
    gen = Generator(backend)
    loop = asyncio.get_running_loop()
    theirs = await lone_ttft_theirs(gen, reqs[1], 3)
    extra["lone"] = {"batcher_ttft_s": ours, "generate_ttft_s": theirs, "ratio": ours / theirs}
    for job in (
        lambda: static_offline(gen, reqs[:n], args.max_batch),
        lambda: ceiling(gen, reqs, args.max_batch),
        lambda: hf_continuous(gen, reqs[:n]),
    ):
        try:
            results.append(await loop.run_in_executor(gen.thread, job))
            note(results[-1])
        except Exception as exc:  # a baseline that fails is reported, not fatal
            print(f"baseline failed: {type(exc).__name__}: {exc}")
            extra.setdefault("failed", []).append(f"{type(exc).__name__}: {exc}")
    gen.thread.shutdown()
    return results, extra


def ops_table(ops: list[dict[str, Any]]) -> None:
    print("ops per step per layer (newcomers joining a running batch):")
    print(
        f"{'newcomers':>10}{'rows':>6}{'attention':>10}{'copy_':>7}{'index writes':>13}{'all aten ops':>13}"
    )
    for o in ops:
        print(
            f"{o['newcomers']:>10}{o['rows']:>6}{o['attention']:>10.2f}{o['copies']:>7.2f}"
            f"{o['index_writes']:>13.2f}{o['total']:>13.1f}"
        )


# -- main -----------------------------------------------------------------------------------------
async def both_patterns(
    system: str, serve: Serve, closed: list[Req], open_: list[Req], args: argparse.Namespace
) -> list[Figures]:
    """``system`` under the closed loop (on ``closed``) then Poisson arrivals (on ``open_``)."""
    obs, wall = await closed_loop(serve, closed, args.concurrency, f"{system} closed")
    out = [figures(system, f"closed c={args.concurrency}", obs, wall)]
    note(out[-1])
    obs, wall = await poisson(serve, open_, args.rate, f"{system} poisson")
    out.append(figures(system, f"poisson {args.rate}/s", obs, wall))
    note(out[-1])
    return out


async def main(args: argparse.Namespace) -> None:
    n = 16 if args.quick else args.prompts
    n_base = 6 if args.quick else args.baseline_prompts
    n_poisson = 6 if args.quick else args.poisson_prompts
    reqs = workload(max(n, 32))
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)  # noqa: ASYNC240
    print(
        f"dtype={args.dtype} device={args.device} torch threads={torch.get_num_threads()} "
        f"OMP_WAIT_POLICY={os.environ.get('OMP_WAIT_POLICY')} "
        f"GOMP_SPINCOUNT={os.environ.get('GOMP_SPINCOUNT')} load average={os.getloadavg()}"
    )
    model = args.model or (random_model_dir(args) if args.random_weights else None)
    backend = HFBackend(model, dtype=args.dtype, device=args.device, cuda_graphs=args.cuda_graphs)
    if args.offline:
        results, extra = await main_offline(args, backend)
        report(results, extra, out, args)
        return
    results = []
    extra = {}
    repeats = 3 if args.quick else 5
    # Phase 1: the batcher, with only its device thread's OpenMP team alive (see the module doc).
    async with Batcher(backend, BatchConfig(max_batch_size=args.concurrency)) as batcher:
        serve = batcher_serve(batcher)
        await serve(Req(reqs[0].messages, 2))  # warm up
        ours = await lone_ttft_ours(batcher, reqs[1], repeats)
        results += await both_patterns("batcher", serve, reqs[:n], reqs[:n_poisson], args)
        extra["batcher_stats"] = str(batcher.stats())[:2000]
    # Phase 2: plain transformers on one dedicated thread (the batcher's threads have exited).
    gen = Generator(backend)
    theirs = await lone_ttft_theirs(gen, reqs[1], repeats)
    extra["lone"] = {"batcher_ttft_s": ours, "generate_ttft_s": theirs, "ratio": ours / theirs}
    print("lone request:", extra["lone"])
    if not args.only_batcher:
        base = reqs[:n_base]
        results += await both_patterns("sequential", sequential_serve(gen), base, base, args)
        static = StaticBatcher(gen, args.window, args.concurrency)
        results += await both_patterns("static", static.serve, reqs[:n], reqs[:n_poisson], args)
        await static.close()
        loop = asyncio.get_running_loop()
        results.append(await loop.run_in_executor(gen.thread, ceiling, gen, reqs, args.concurrency))
        note(results[-1])
        # Phase 3: thread per request (many OpenMP teams: the common recipe's own cost), last.
        results += await both_patterns("threads", threads_serve(gen), base, base, args)
    gen.thread.shutdown()
    report(results, extra, out, args)


def report(results: list[Figures], extra: dict[str, Any], out: Path, args: argparse.Namespace) -> None:
    """Print the table (and the ops figure), write the JSON and the PNG."""
    table(results)
    if "ops" in extra:
        ops_table(extra["ops"])
    if "lone" in extra:
        print("lone request:", extra["lone"])
    tag = f"{args.device.replace(':', '')}-{args.dtype}" + (f"-offline{args.offline}" if args.offline else "")
    tag += "-graphs" if args.cuda_graphs else ""
    (out / f"results-{tag}.json").write_text(
        json.dumps({"args": vars(args), "results": [asdict(r) for r in results], **extra}, indent=2)
    )
    plot(results, extra, out / f"bench_hf-{tag}.png", tag)
    print(f"wrote {out}/results-{tag}.json and bench_hf-{tag}.png")


def note(r: Figures) -> None:
    r.extra["load_average"] = os.getloadavg()[0]
    tqdm.write(
        f"{r.system} {r.pattern}: {r.tokens_per_s:.1f} tok/s, TTFT p50 {r.ttft_p50:.3f} s, "
        f"e2e p50 {r.e2e_p50:.2f} s (load average {r.extra['load_average']:.1f})"
    )


def table(results: list[Figures]) -> None:
    head = (
        f"{'system':<11}{'pattern':<17}{'reqs':>5}{'tok/s':>8}{'TTFT p50':>10}{'p99':>8}"
        f"{'e2e p50':>9}{'p99':>8}"
    )
    print(head)
    for r in results:
        print(
            f"{r.system:<11}{r.pattern:<17}{r.requests:>5}{r.tokens_per_s:>8.1f}{r.ttft_p50:>10.3f}"
            f"{r.ttft_p99:>8.3f}{r.e2e_p50:>9.2f}{r.e2e_p99:>8.2f}"
        )


def plot(results: list[Figures], extra: dict[str, Any], path: Path, dtype: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(16, 5))
    closed = [r for r in results if r.pattern.startswith(("closed", "one", "offline"))]
    pois = [r for r in results if r.pattern.startswith(("poisson", "offline"))]
    ax = axes[0]
    ax.bar([f"{r.system}\n{r.pattern}" for r in closed], [r.tokens_per_s for r in closed], color="tab:blue")
    ax.set_title(f"useful tokens/s ({dtype})\n(ceiling: computed tokens/s of one batch)")
    for i, r in enumerate(closed):
        ax.text(i, r.tokens_per_s, f"{r.tokens_per_s:.0f}", ha="center", va="bottom")
    for ax, group, title in [(axes[1], closed, "closed loop"), (axes[2], pois, "Poisson / offline")]:
        xs = range(len(group))
        ax.bar([x - 0.2 for x in xs], [r.ttft_p50 for r in group], 0.4, label="TTFT p50")
        ax.bar([x + 0.2 for x in xs], [r.ttft_p99 for r in group], 0.4, label="TTFT p99")
        ax.plot(list(xs), [r.e2e_p50 for r in group], "k^", label="end-to-end p50")
        ax.set_xticks(list(xs), [f"{r.system}\n{r.pattern}" for r in group])
        ax.set_yscale("log")
        ax.set_ylabel("seconds")
        ax.set_title(f"latency, {title}")
        ax.legend()
    lone = extra.get("lone")
    if lone:
        fig.suptitle(
            f"SmolLM2-135M {dtype}: lone request TTFT {lone['batcher_ttft_s'] * 1000:.0f} ms "
            f"vs generate {lone['generate_ttft_s'] * 1000:.0f} ms ({lone['ratio']:.2f}x)"
        )
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def parse() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], default="float32")
    p.add_argument("--quick", action="store_true", help="a small subset, for a fast look")
    p.add_argument("--out", default="out/bench_hf")
    p.add_argument("--prompts", type=int, default=64)
    p.add_argument("--baseline-prompts", type=int, default=16)
    p.add_argument("--poisson-prompts", type=int, default=24)
    p.add_argument("--concurrency", type=int, default=32)
    p.add_argument("--rate", type=float, default=0.5)
    p.add_argument("--window", type=float, default=0.05, help="static batching window, seconds")
    p.add_argument("--only-batcher", action="store_true", help="skip the baselines")
    p.add_argument("--device", default="cpu", help="cpu, cuda, cuda:1...")
    p.add_argument("--model", help="a model folder (default: the embedded SmolLM2)")
    p.add_argument("--cuda-graphs", action="store_true", help="CUDA: replay decode steps as graphs")
    p.add_argument(
        "--random-weights",
        action="store_true",
        help="SmolLM2's config with random weights (no embedded model needed)",
    )
    p.add_argument("--tokenizer", help="with --random-weights: a folder with SmolLM2's config and tokenizer")
    p.add_argument(
        "--offline",
        type=int,
        default=0,
        metavar="N",
        help="submit N prompts at once: ours, static batching, ceiling, transformers' continuous batching",
    )
    p.add_argument("--max-batch", type=int, default=64, help="offline: max batch size (ours and static)")
    return p.parse_args()


if __name__ == "__main__":
    asyncio.run(main(parse()))
