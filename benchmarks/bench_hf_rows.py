"""What the per-row Python left on a step's hot path costs: sampling and ``Row.advance`` (stop
checks, incremental detokenization) for ``--rows`` rows, without the model.

    python benchmarks/bench_hf_rows.py --rows 256 --steps 50

Prints milliseconds per step for: choosing the tokens (all greedy; half sampled with top-p/top-k,
a quarter of those seeded) and advancing every row (detokenizer + stop matcher). Compare with a
step's time on the device (the SmolLM2 benchmarks) to see whether it matters.
"""

from __future__ import annotations

import batcher.adapters.hf  # noqa: F401  (first: it sets OpenMP's wait policy before torch loads)

# isort: split
import argparse
import random
import statistics
import time

import torch
from batcher.adapters.hf._load import embedded_model_dir
from batcher.adapters.hf._rows import Row
from batcher.adapters.hf._sampling import sample
from transformers import AutoTokenizer

from batcher.backend import SamplingParams


def rows(tok: object, n: int, sampled: bool) -> list[Row]:
    rng = random.Random(0)
    out = []
    for i in range(n):
        params = SamplingParams(max_tokens=10_000, stop=("\n\n",))
        if sampled and i % 2:
            seed = i if i % 4 == 1 else None
            params = SamplingParams(max_tokens=10_000, temperature=0.8, top_p=0.9, top_k=50, seed=seed)
        prompt = [rng.randrange(200, 40_000) for _ in range(20)]
        out.append(Row.new(i, prompt, params, tok, frozenset()))
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rows", type=int, default=256)
    p.add_argument("--steps", type=int, default=50)
    args = p.parse_args()
    tok = AutoTokenizer.from_pretrained(str(embedded_model_dir()))
    gen = torch.Generator().manual_seed(0)
    for sampled in (False, True):
        batch = rows(tok, args.rows, sampled)
        t_sample, t_advance = [], []
        for _ in range(args.steps):
            logits = torch.randn(args.rows, len(tok)) * 4  # about as peaked as a real model's
            t0 = time.perf_counter()
            tokens = sample(logits, [r.sampler for r in batch], gen)
            t1 = time.perf_counter()
            for r, t in zip(batch, tokens, strict=True):
                r.advance(t % 40_000 + 200, frozenset(), 100_000)
            t2 = time.perf_counter()
            t_sample.append(t1 - t0)
            t_advance.append(t2 - t1)
        kind = "half sampled" if sampled else "all greedy"
        print(
            f"{args.rows} rows, {kind}: sample {statistics.median(t_sample) * 1e3:.2f} ms/step, "
            f"advance (detok + stops) {statistics.median(t_advance) * 1e3:.2f} ms/step "
            f"({statistics.median(t_advance) / args.rows * 1e6:.1f} us/row)"
        )


if __name__ == "__main__":
    main()
