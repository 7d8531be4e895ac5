"""The per-step cost of penalties, logit bias, min-p and logprobs at ``--rows`` rows, without the model.

    python benchmarks/bench_sampling.py --rows 32 --steps 200

Prints milliseconds per step (median) of ``Penalties.apply`` + ``sample`` + ``Penalties.record``
(and, where rows ask for logprobs, ``top_logprobs`` before and its ``entries`` after, as
``HFBackend`` runs them) for: a plain batch (nothing used: the path every step pays when no row
asks; the backend skips logprobs on a counter of asking rows, as here), every row penalised
(presence + frequency + repetition + 8 logit-bias entries), every row penalised and sampling with
min-p, and every row asking for its token's logprob and the top 5. The cases are interleaved step
by step so machine load hits them alike; compare with a step's model time (``bench_hf.py``) to see
whether it matters.
"""

from __future__ import annotations

import batcher.adapters.hf  # noqa: F401  (first: it sets OpenMP's wait policy before torch loads)

# isort: split
import argparse
import random
import statistics
import time

import torch
from batcher.adapters.hf._sampling import Penalties, RowSampler, sample, top_logprobs

from batcher.backend import SamplingParams

VOCAB = 49_152  # SmolLM2's


def _case(
    rows: int, penalised: bool, min_p: float, logprobs: int | None = None
) -> tuple[Penalties, list[SamplingParams], list[RowSampler | None]]:
    rng = random.Random(0)
    params = []
    for _ in range(rows):
        if penalised:
            bias = tuple(sorted((rng.randrange(VOCAB), 2.0) for _ in range(8)))
            params.append(
                SamplingParams(
                    presence_penalty=0.5,
                    frequency_penalty=0.3,
                    repetition_penalty=1.2,
                    logit_bias=bias,
                    temperature=0.8,
                    min_p=min_p,
                )
            )
        else:
            params.append(SamplingParams(temperature=0.8, logprobs=logprobs))
    pen = Penalties(VOCAB, torch.device("cpu"))
    prompts = [[rng.randrange(VOCAB) for _ in range(200)] for _ in range(rows)]
    pen.admit(0, prompts, params)
    samplers: list[RowSampler | None] = [
        RowSampler(temperature=p.temperature, top_k=0, top_p=0.9, seed=None, min_p=p.min_p) for p in params
    ]
    return pen, params, samplers


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rows", type=int, default=32)
    p.add_argument("--steps", type=int, default=200)
    args = p.parse_args()
    torch.set_num_threads(1)
    gen = torch.Generator().manual_seed(0)
    cases = {
        "plain (nothing used)": _case(args.rows, False, 0.0),
        "penalties + logit_bias": _case(args.rows, True, 0.0),
        "penalties + logit_bias + min_p": _case(args.rows, True, 0.05),
        "logprobs, top 5 (every row)": _case(args.rows, False, 0.0, logprobs=5),
    }
    token_bytes = {t: f"t{t}".encode() for t in range(VOCAB)}.__getitem__  # HFBackend caches them too
    times: dict[str, list[float]] = {name: [] for name in cases}
    with torch.inference_mode():
        for _ in range(args.steps):
            logits = torch.randn(args.rows, VOCAB) * 4  # about as peaked as a real model's
            for name, (pen, params, samplers) in cases.items():
                step_logits = logits.clone()  # penalties change them in place
                t0 = time.perf_counter()
                asking = any(p.logprobs is not None for p in params)  # HFBackend: a counter
                asked = top_logprobs(step_logits, [p.logprobs for p in params]) if asking else None
                tokens = sample(pen.apply(step_logits, params), samplers, gen)
                pen.record(tokens)
                if asked is not None:
                    asked.entries(tokens, token_bytes)
                times[name].append(time.perf_counter() - t0)
    print(
        f"rows={args.rows} vocab={VOCAB} steps={args.steps} threads=1 (CPU; medians, noisy on a shared host)"
    )
    base = statistics.median(times["plain (nothing used)"])
    for name, ts in times.items():
        med = statistics.median(ts)
        print(f"  {name:34s} {med * 1e3:7.2f} ms/step  (+{(med - base) * 1e3:.2f} ms over plain)")


if __name__ == "__main__":
    main()
