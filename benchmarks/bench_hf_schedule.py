"""A/B timing of HFBackend on a fixed schedule: the closed loop of ``bench_hf.py``, replayed on the
backend alone.

``bench_hf.py``'s closed loop depends on timing (who finishes first decides who joins next), and on
this shared machine one run can differ from the next by 20 %. Here the loop is replayed step by
step with no event loop: 32 slots, each freed slot refilled at once with the next of the same 64
prompts, so two builds run exactly the same schedule, and interleaved runs compare them::

    python benchmarks/bench_hf_schedule.py --dtype float32 --repeats 3

(To compare against an older build, put its ``batcher`` package first on ``PYTHONPATH`` and run
from outside the repository.) Prints steps, tokens, wall time and tokens/s per repeat.
"""

from __future__ import annotations

import batcher.adapters.hf  # noqa: F401  (first: it sets OpenMP's wait policy before torch loads)

# isort: split
import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))

from batcher.adapters.hf._backend import HFBackend
from bench_hf import workload

from batcher.backend import NewSequence, SamplingParams


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dtype", default="float32")
    p.add_argument("--repeats", type=int, default=1)
    p.add_argument("--prompts", type=int, default=64)
    p.add_argument("--concurrency", type=int, default=32)
    args = p.parse_args()
    backend = HFBackend(dtype=args.dtype)
    backend.start()
    reqs = workload(args.prompts)
    ids = [backend.tokenize(r.messages) for r in reqs]
    for _ in range(args.repeats):
        pending, live, steps, tokens = list(range(len(reqs))), 0, 0, 0
        t0 = time.perf_counter()
        while pending or live:
            free = args.concurrency - live
            admit = [
                NewSequence(i, ids[i], SamplingParams(max_tokens=reqs[i].max_tokens)) for i in pending[:free]
            ]
            pending = pending[free:]
            live += len(admit)
            res = backend.step(admit, [])
            steps += 1
            for out in res.outputs:
                tokens += len(out.token_ids)
                live -= out.finish_reason is not None
        wall = time.perf_counter() - t0
        rate = tokens / wall
        print(f"{args.dtype}: {steps} steps, {tokens} tokens, {wall:.2f} s, {rate:.1f} tok/s", flush=True)
    backend.close()


if __name__ == "__main__":
    main()
