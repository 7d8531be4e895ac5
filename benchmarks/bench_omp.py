"""OpenMP wait policies on an idle and a busy machine: which one should the HF backend ship?

torch's CPU kernels run on libgomp, whose idle threads spin before sleeping. Spinning makes a step
faster on an idle machine; on a machine shared with busy processes, spinning threads steal the
CPU from the thread that holds the work, and a step can take many times longer. libgomp reads its
settings once, when torch loads, so each policy runs in a fresh child process::

    python benchmarks/bench_omp.py                  # every policy, idle and with 2 busy neighbours
    python benchmarks/bench_omp.py --busy 0 1 2     # choose the neighbour counts

Each child serves the embedded SmolLM2 (fp32) on the backend alone: a lone request's decode step
(what a single streaming client sees per token) and a 32-row decode step (throughput). Prints one
table of medians; ``benchmarks/results/bench_omp.txt`` keeps a run.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import statistics
import subprocess
import sys
import time

POLICIES: dict[str, dict[str, str]] = {
    "GOMP_SPINCOUNT=300000": {"GOMP_SPINCOUNT": "300000"},
    "OMP_WAIT_POLICY=PASSIVE": {"OMP_WAIT_POLICY": "PASSIVE"},
    "GOMP_SPINCOUNT=1000": {"GOMP_SPINCOUNT": "1000"},
    "GOMP_SPINCOUNT=10000": {"GOMP_SPINCOUNT": "10000"},
    "GOMP_SPINCOUNT=100000": {"GOMP_SPINCOUNT": "100000"},
    "nothing set (libgomp default)": {},
}
_OMP_VARS = ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT")


def child(steps: int) -> None:
    """Time decode steps of the embedded model: one row, then 32 rows."""
    from batcher.adapters import HFBackend

    from batcher.backend import NewSequence, SamplingParams

    backend = HFBackend(dtype="float32")
    backend.start()
    prompt = backend.tokenize([{"role": "user", "content": "Write a long story about a lighthouse keeper."}])
    out = {}
    for rows in (1, 32):
        news = [NewSequence(i, prompt, SamplingParams(max_tokens=steps + 8)) for i in range(rows)]
        backend.step(news, [])
        times = []
        for _ in range(steps):
            t0 = time.perf_counter()
            backend.step([], [])
            times.append(time.perf_counter() - t0)
            assert backend.live_sequences == rows, "a sequence ended early: the figure would be wrong"
        backend.step([], list(range(rows)))
        out[rows] = statistics.median(times[2:]) * 1e3
    backend.close()
    print(json.dumps(out))


def spin() -> None:
    while True:
        pass


def run(env: dict[str, str], busy: int, steps: int) -> dict[str, float]:
    hogs = [multiprocessing.Process(target=spin, daemon=True) for _ in range(busy)]
    for h in hogs:
        h.start()
    try:
        base = {k: v for k, v in os.environ.items() if k not in _OMP_VARS}
        done = subprocess.run(
            [sys.executable, __file__, "--child", "--steps", str(steps)],
            env={**base, **env},
            capture_output=True,
            text=True,
            timeout=900,
        )
    finally:
        for h in hogs:
            h.terminate()
            h.join()
    if done.returncode:
        raise SystemExit(done.stderr[-2000:])
    return {k: float(v) for k, v in json.loads(done.stdout.strip().splitlines()[-1]).items()}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--busy", type=int, nargs="+", default=[0, 2], help="busy neighbour processes")
    p.add_argument("--steps", type=int, default=24)
    p.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        child(args.steps)
        return
    print(f"{os.cpu_count()} CPUs; decode step medians in ms (lone request / 32 rows)", flush=True)
    header = f"{'policy':40}" + "".join(f"{f'{b} busy neighbours':>24}" for b in args.busy)
    print(header, flush=True)
    for name, env in POLICIES.items():
        cells = []
        for b in args.busy:
            r = run(env, b, args.steps)
            cells.append(f"{r['1']:9.1f} / {r['32']:7.1f}")
        print(f"{name:40}" + "".join(f"{c:>24}" for c in cells), flush=True)


if __name__ == "__main__":
    main()
