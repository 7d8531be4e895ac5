"""A real CUDA out-of-memory error, survived (issue 13): the process may use only a slice of the GPU.

After the weights load, ``torch.cuda.set_per_process_memory_fraction`` caps the process at what it
holds plus ``--headroom-mb``; the backend is told its KV memory is ample, so the engine first admits
a batch of long prompts that cannot fit. CUDA raises ``torch.OutOfMemoryError`` inside the step; the
engine halves the batch and the KV budget until it fits (``batcher_step_splits_total``), and every
request must still finish. Without CUDA it says so and exits 0 (a host's memory cannot be capped
this way).

    python benchmarks/gpu_faults.py [--requests 64] [--prompt-tokens 1500] [--headroom-mb 300]
        [--model PATH | --random-weights --tokenizer DIR]
"""

from __future__ import annotations

import batcher.adapters.hf  # noqa: F401  (first: it sets OpenMP's wait policy before torch loads)

# isort: split
import argparse
import asyncio
import sys
import tempfile
import time
from pathlib import Path

import torch
from batcher.adapters.hf._backend import HFBackend
from batcher.adapters.hf._load import embedded_model_dir

from batcher import BatchConfig, Batcher, RequestFailed

sys.path.insert(0, str(Path(__file__).parent))
from gpu_equivalence import peaked_random_model


async def serve(backend: HFBackend, n: int, prompt_tokens: int) -> tuple[int, int, int]:
    """``n`` long prompts at once: (finished, failed, step splits)."""
    words = " ".join(f"word{i}" for i in range(prompt_tokens // 3))
    async with Batcher(backend, BatchConfig(max_batch_size=n, batch_window_s=0.2)) as b:
        results = await asyncio.gather(
            *(b.generate(f"{i}: {words}", max_tokens=32) for i in range(n)), return_exceptions=True
        )
        splits = b.engine_stats()[0].stats.step_splits
    failed = [r for r in results if isinstance(r, BaseException)]
    for r in failed[:3]:
        print(f"failed: {r!r}")
    if any(not isinstance(r, RequestFailed) for r in failed):
        raise next(r for r in failed if not isinstance(r, RequestFailed))
    return n - len(failed), len(failed), splits


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--requests", type=int, default=64)
    p.add_argument("--prompt-tokens", type=int, default=1500)
    p.add_argument("--headroom-mb", type=int, default=300)
    p.add_argument("--model")
    p.add_argument("--random-weights", action="store_true")
    p.add_argument(
        "--tokenizer", help="a folder with SmolLM2's config and tokenizer (default: the embedded model)"
    )
    args = p.parse_args()
    if not torch.cuda.is_available():
        print("no CUDA device: the out-of-memory check needs a GPU whose memory can be capped; skipped")
        return 0
    model = args.model
    if args.random_weights:
        src = args.tokenizer or str(embedded_model_dir())
        model = peaked_random_model(src, Path(tempfile.gettempdir()) / "llm-batcher-peaked-smollm2")
    backend = HFBackend(model, dtype="bfloat16", device="cuda", kv_memory_gb=64)
    backend.start()
    torch.cuda.synchronize()
    total = torch.cuda.get_device_properties(0).total_memory
    held = torch.cuda.memory_reserved()
    cap = held + args.headroom_mb * (1 << 20)
    torch.cuda.set_per_process_memory_fraction(cap / total)
    need = args.requests * (args.prompt_tokens + 32) * backend.kv_bytes_per_token
    print(
        f"process capped at {cap / 2**20:.0f} MiB ({held / 2**20:.0f} held after loading); "
        f"{args.requests} prompts of ~{args.prompt_tokens} tokens need ~{need / 2**20:.0f} MiB of KV at once"
    )
    t0 = time.perf_counter()
    finished, failed, splits = asyncio.run(serve(backend, args.requests, args.prompt_tokens))
    print(
        f"{finished} of {args.requests} finished, {failed} failed, {splits} step splits, "
        f"in {time.perf_counter() - t0:.1f} s"
    )
    ok = finished == args.requests and splits >= 1
    print("PASS: out of memory shrank the batch and every request finished" if ok else "FAIL")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
