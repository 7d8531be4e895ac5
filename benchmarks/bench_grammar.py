"""The per-step cost of structured output's token masks (``_grammar``), on SmolLM2's tokenizer.

    python benchmarks/bench_grammar.py --rows 1 32 --steps 200
    python benchmarks/bench_grammar.py --overlap        # + the model: do masks overlap a forward?
    python benchmarks/bench_grammar.py --backend plain  # HFBackend tokens/s, no response_format
    python benchmarks/bench_grammar.py --backend json_object  # the same, every row json_object

Prints, at each ``--rows``: the grammar compile times (tokenizer, json_object, a modest schema,
one sequence's matcher copy), then milliseconds per step (median, p90) of ``TokenMasks.apply``
over ``[rows, 49152]`` float32 logits for: no row constrained (what every plain step pays), every
row json_object, every row the schema, half the rows json_object; and the mask fill alone (the
llguidance part) for json_object. The cases are interleaved step by step so machine load hits them
alike. Each constrained row walks a real JSON document token by token (a new one when it ends), so
the masks are those of real states. ``--overlap`` loads the model and times a batch-32 decode
forward alone, 32 json_object mask fills alone, and both at once (the fills on a second thread):
llguidance releases the GIL, so the pair takes about the longer of the two when a core is free.

``--backend plain|json_object`` runs only the real ``HFBackend``: ``--rows`` chats admitted at once
and stepped until all end (greedy, ``max_tokens`` 64), a warm-up round then ``--rounds`` timed
ones; it prints generated tokens per second (median) and the median decode step (``json_object``
adds a system message asking for JSON, so the rows write objects rather than close one at once).
``plain`` imports nothing of structured output, so the same file measures a checkout without it:
run it alternately in both checkouts' venvs to see what the wiring costs a batch that does not
use it.
"""

from __future__ import annotations

import batcher.adapters.hf  # noqa: F401  (first: it sets OpenMP's wait policy before torch loads)

# isort: split
import argparse
import json
import random
import statistics
import threading
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import torch
from batcher.adapters.hf._load import embedded_model_dir

if TYPE_CHECKING:  # imported in the functions: ``--backend plain`` runs on checkouts without them
    from batcher.adapters.hf._grammar import GrammarCompiler, Matcher

    from batcher.backend import ResponseFormat

EOS = 2
SCHEMA = {
    "type": "object",
    "properties": {
        "name": {"type": "string"},
        "age": {"type": "integer", "minimum": 0},
        "email": {"type": "string"},
        "tags": {"type": "array", "items": {"type": "string"}},
        "address": {
            "type": "object",
            "properties": {"city": {"type": "string"}, "zip": {"type": "string"}},
            "required": ["city", "zip"],
            "additionalProperties": False,
        },
        "active": {"type": "boolean"},
    },
    "required": ["name", "age", "email", "tags", "address", "active"],
    "additionalProperties": False,
}


def document(rng: random.Random) -> str:
    """A JSON document that is an instance of ``SCHEMA`` (so of json_object too)."""
    n = rng.randrange(1000)
    return json.dumps(
        {
            "name": f"Person {n} " + "x" * rng.randrange(12),
            "age": rng.randrange(100),
            "email": f"p{n}@example.org",
            "tags": [f"tag {i}" for i in range(rng.randrange(4))],
            "address": {"city": rng.choice(["Lyon", "Osaka", "Quito"]), "zip": str(10000 + n)},
            "active": rng.random() < 0.5,
        }
    )


class Walker:
    """A matcher fed a real document token by token; a fresh document when one ends."""

    def __init__(self, compiler: GrammarCompiler, fmt: ResponseFormat, tok: Any, rng: random.Random) -> None:
        self.compiler, self.fmt, self.tok, self.rng = compiler, fmt, tok, rng
        self._restart()

    def _restart(self) -> None:
        self.matcher = self.compiler.matcher(self.fmt)
        self.tokens = list(self.tok(document(self.rng), add_special_tokens=False)["input_ids"])

    def step(self) -> None:
        self.matcher.advance(self.tokens.pop(0))
        if self.matcher.error:
            raise RuntimeError(f"the document left the grammar: {self.matcher.error}")
        if not self.tokens:
            self._restart()


def timed(fn: Callable[[], Any]) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def compile_times(tok: Any, vocab: int) -> None:
    from batcher.adapters.hf._grammar import GrammarCompiler

    from batcher.backend import ResponseFormat

    t0 = time.perf_counter()
    compiler = GrammarCompiler(tok, vocab=vocab, eos=[EOS])
    print(f"tokenizer for llguidance: {1e3 * (time.perf_counter() - t0):.0f} ms (once per backend)")
    for name, fmt in (
        ("json_object", ResponseFormat.json_object()),
        ("schema", ResponseFormat.json_schema(SCHEMA)),
    ):
        ms = 1e3 * timed(lambda fmt=fmt: compiler.check(fmt))
        copy = 1e3 * timed(lambda fmt=fmt: compiler.matcher(fmt))
        print(f"compile {name}: {ms:.2f} ms; a sequence's matcher (cached): {copy:.3f} ms")


def mask_costs(tok: Any, vocab: int, rows: int, steps: int) -> None:
    from batcher.adapters.hf._grammar import GrammarCompiler, TokenMasks

    from batcher.backend import ResponseFormat

    compiler = GrammarCompiler(tok, vocab=vocab, eos=[EOS])
    rng = random.Random(rows)
    obj, schema = ResponseFormat.json_object(), ResponseFormat.json_schema(SCHEMA)
    cases: dict[str, list[Walker | None]] = {
        "no row constrained": [None] * rows,
        "every row json_object": [Walker(compiler, obj, tok, rng) for _ in range(rows)],
        "every row json_schema": [Walker(compiler, schema, tok, rng) for _ in range(rows)],
        "half the rows json_object": [
            Walker(compiler, obj, tok, rng) if i % 2 else None for i in range(rows)
        ],
    }
    fill_walkers = [Walker(compiler, obj, tok, rng) for _ in range(rows)]
    masks = TokenMasks(vocab, torch.device("cpu"), rows=rows)
    bitmask = torch.zeros(rows, masks.words, dtype=torch.int32)
    times: dict[str, list[float]] = {name: [] for name in [*cases, "fill only, json_object"]}
    with torch.inference_mode():
        for _ in range(steps):
            logits = torch.randn(rows, vocab)
            for name, walkers in cases.items():
                matchers: list[Matcher | None] = [w.matcher if w else None for w in walkers]
                step_logits = logits.clone()
                times[name].append(timed(lambda m=matchers, lg=step_logits: masks.apply(lg, m)))
                for w in walkers:
                    if w is not None:
                        w.step()
            fills = [w.matcher for w in fill_walkers]
            times["fill only, json_object"].append(
                timed(lambda f=fills: [m.fill(row) for m, row in zip(f, bitmask, strict=True)])
            )
            for w in fill_walkers:
                w.step()
    print(f"rows {rows}, {steps} steps, torch threads {torch.get_num_threads()}: ms per step (median, p90)")
    for name, ts in times.items():
        q = statistics.quantiles(ts, n=10)
        print(f"  {name:28s} {1e3 * statistics.median(ts):8.3f} {1e3 * q[-1]:8.3f}")


def overlap(tok: Any, vocab: int, steps: int) -> None:
    from batcher.adapters.hf._grammar import GrammarCompiler
    from transformers import AutoModelForCausalLM, DynamicCache

    from batcher.backend import ResponseFormat

    model = AutoModelForCausalLM.from_pretrained(str(embedded_model_dir()), dtype=torch.float32).eval()
    compiler = GrammarCompiler(tok, vocab=vocab, eos=[EOS])
    rng = random.Random(0)
    walkers = [Walker(compiler, ResponseFormat.json_object(), tok, rng) for _ in range(32)]
    bitmask = torch.zeros(32, (vocab + 31) // 32, dtype=torch.int32)
    kv = DynamicCache()
    ids = torch.randint(100, 10_000, (32, 64))
    with torch.inference_mode():
        model(input_ids=ids, cache=kv, use_cache=True)

        def forward() -> None:
            model(input_ids=ids[:, :1], cache=kv, use_cache=True)
            kv.crop(-1)

        def fill() -> None:
            for w, row in zip(walkers, bitmask, strict=True):
                w.matcher.fill(row)
            for w in walkers:
                w.step()

        def both() -> None:
            side = threading.Thread(target=fill)
            side.start()
            forward()
            side.join()

        times: dict[str, list[float]] = {"forward": [], "32 fills": [], "both at once": []}
        for _ in range(steps):
            times["forward"].append(timed(forward))
            times["32 fills"].append(timed(fill))
            times["both at once"].append(timed(both))
    print(f"overlap, batch 32 decode over 64 cached tokens, {steps} steps: ms (median)")
    for name, ts in times.items():
        print(f"  {name:14s} {1e3 * statistics.median(ts):8.2f}")


CHATS = [
    "Tell me about the history of Rome.",
    "Describe a day at the beach.",
    "What makes a good cup of coffee?",
    "Explain how a bicycle works.",
    "Write about your favourite season.",
    "Give advice to a new gardener.",
    "Describe the planets of the solar system.",
    "What is the best way to learn a language?",
]


def backend_throughput(mode: str, rows: int, rounds: int) -> None:
    """Tokens per second of HFBackend alone: ``rows`` chats admitted together, stepped to the end."""
    from batcher.adapters.hf import HFBackend

    from batcher.backend import NewSequence, SamplingParams

    extra: dict[str, Any] = {}
    if mode == "json_object":
        from batcher.backend import ResponseFormat

        extra["response_format"] = ResponseFormat.json_object()
    backend = HFBackend(dtype="float32")
    backend.start()
    system = [{"role": "system", "content": "Answer with one JSON object of several keys."}] if extra else []
    chats = [[*system, {"role": "user", "content": CHATS[i % len(CHATS)]}] for i in range(rows)]
    prompts = [backend.tokenize(chat) for chat in chats]
    params = SamplingParams(max_tokens=64, **extra)
    rates, steps = [], []
    for r in range(rounds + 1):
        admit = [NewSequence(r * rows + i, p, params) for i, p in enumerate(prompts)]
        tokens, t0 = 0, time.perf_counter()
        while admit or backend.live_sequences:
            t1 = time.perf_counter()
            result = backend.step(admit, ())
            if r and not admit:  # decode steps only: the prefill step is the same in both modes
                steps.append(time.perf_counter() - t1)
            admit = []
            tokens += sum(len(o.token_ids) for o in result.outputs)
        if r:  # the first round warms up
            rates.append(tokens / (time.perf_counter() - t0))
    backend.close()
    print(f"HFBackend {mode}, {rows} rows x <= 64 tokens, {rounds} rounds:")
    print(f"  {statistics.median(rates):.1f} tok/s (rounds: {', '.join(f'{x:.1f}' for x in rates)})")
    print(f"  decode step {1e3 * statistics.median(steps):.1f} ms median over {len(steps)} steps")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rows", type=int, nargs="+", default=[1, 32])
    p.add_argument("--steps", type=int, default=200)
    p.add_argument("--overlap", action="store_true", help="also time masks against a model forward")
    p.add_argument("--backend", choices=["plain", "json_object"], help="only HFBackend's tokens/s")
    p.add_argument("--rounds", type=int, default=3)
    args = p.parse_args()
    if args.backend:
        for rows in args.rows:
            backend_throughput(args.backend, rows, args.rounds)
        return
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(embedded_model_dir()))
    vocab = len(tok)
    compile_times(tok, vocab)
    for rows in args.rows:
        mask_costs(tok, vocab, rows, args.steps)
    if args.overlap:
        overlap(tok, vocab, min(args.steps, 30))


if __name__ == "__main__":
    main()
