"""A/B of one HF backend setting on step times, in one process: two SmolLM2 backends, one with the
setting and one without, their steps interleaved, so the machine's drift (often +-20 % between
processes on the 2-core CI machine) falls on both alike.

Each side first admits ``--rows`` prompts (the ``bench_prefix`` workload: a ~400-token system
prompt, then a short question), then repeats: admit one more prompt (a *newcomer step*: its
uncached suffix prefilled beside the decode rows), then drop it in a *decode step*. The order of
the two sides alternates. Prints the median of each kind of step, per side. Differences under
~4 % are noise on the 2-core machine: a change that could not touch decode steps moved them by
-2.1 to +4.3 % in six runs.

    .venv/bin/python benchmarks/bench_step_ab.py --setting fused-linears [--rows 3] [--steps 40]

Settings: ``fused-linears`` (sibling projections share one packed product, ``_cpu_linear.Fused``).
A setting read at each step is held while the "off" side steps, so it can be added here too.
"""

from __future__ import annotations

import batcher.adapters.hf  # noqa: F401  (first: it sets OpenMP's wait policy before torch loads)

# isort: split
import argparse
import statistics
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, contextmanager, nullcontext
from pathlib import Path

from batcher.adapters.hf import _cpu_linear
from batcher.adapters.hf._backend import HFBackend

from batcher.backend import NewSequence, PreparedPrompt, PrepareRequest, SamplingParams

sys.path.insert(0, str(Path(__file__).parent))
from bench_hf import workload
from bench_prefix import system_prompt, with_system


@contextmanager
def without_fused_linears() -> Iterator[None]:
    names, _cpu_linear.FUSED_NAMES = _cpu_linear.FUSED_NAMES, ()
    try:
        yield
    finally:
        _cpu_linear.FUSED_NAMES = names


SETTINGS: dict[str, Callable[[], AbstractContextManager[None]]] = {
    "fused-linears": without_fused_linears,
}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--setting", choices=sorted(SETTINGS), default="fused-linears")
    p.add_argument("--rows", type=int, default=3, help="decode rows beside each newcomer")
    p.add_argument("--steps", type=int, default=40, help="newcomer + decode step pairs per side")
    p.add_argument("--dtype", default="float32")
    args = p.parse_args()

    setting = SETTINGS[args.setting]  # held while the "off" side loads and while it steps
    on = HFBackend(dtype=args.dtype)
    on.start()
    with setting():
        off = HFBackend(dtype=args.dtype)
        off.start()
    count = args.rows + args.steps
    reqs = with_system(workload(count, seed=1), system_prompt(on, 400))
    params = SamplingParams(max_tokens=1000)
    prompts: list[list[int]] = []
    for r in reqs:
        prepared = on.prepare([PrepareRequest(r.messages, params)])[0]
        assert isinstance(prepared, PreparedPrompt), prepared
        prompts.append(list(prepared.token_ids))
    ids = iter(range(1, 10**9))
    for side, b in (("on", on), ("off", off)):
        for i in range(args.rows):
            with setting() if side == "off" else nullcontext():
                b.step([NewSequence(next(ids), prompts[i], params)], [])
    times: dict[tuple[str, str], list[float]] = {(s, k): [] for s in ("on", "off") for k in ("new", "dec")}
    for k in range(args.steps):
        sides = [("on", on), ("off", off)]
        for side, b in sides if k % 2 else sides[::-1]:
            new = NewSequence(next(ids), prompts[args.rows + k], params)
            with setting() if side == "off" else nullcontext():
                t0 = time.perf_counter()
                b.step([new], [])
                t1 = time.perf_counter()
                b.step([], [new.seq_id])
                t2 = time.perf_counter()
            times[(side, "new")].append(t1 - t0)
            times[(side, "dec")].append(t2 - t1)
    for kind, what in (("new", "newcomer step"), ("dec", "decode step")):
        a, b_ = (statistics.median(times[(side, kind)]) * 1e3 for side in ("on", "off"))
        print(
            f"{args.setting}, {args.rows} decode rows, {what}: on {a:.1f} ms, off {b_:.1f} ms "
            f"({(a / b_ - 1) * 100:+.1f} %)"
        )


if __name__ == "__main__":
    main()
