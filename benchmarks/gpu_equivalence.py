"""fp32 equivalence on any device: batched greedy tokens == solo ``generate``, token for token.

The CUDA twin of ``tests/adapters/test_hf_smollm2.py``'s equivalence test (which runs on the CPU):
18 prompts of many lengths arrive staggered, three are cancelled, and each sequence's tokens must
equal its solo ``model.generate(do_sample=False)`` on a plain transformers copy on the same device.
With ``--cuda-graphs`` the decode-only steps replay CUDA graphs (``_graphs``). With ``--system N``
every chat prompt starts with the same ~N-token system prompt, so the later ones reuse it from the
prefix cache (``_prefix``): cached keys/values must give the same tokens as computed ones.
Without the embedded model (``--model``), ``--random-weights`` uses SmolLM2's config with peaked
random weights (initializer_range 0.5: no near-ties) and the tokenizer of ``--tokenizer``.

    python benchmarks/gpu_equivalence.py --device cuda [--cuda-graphs] [--system 200]
        [--random-weights --tokenizer DIR]

Prints one line per sequence and a summary; exits 1 on any mismatch.
"""

from __future__ import annotations

import batcher.adapters.hf  # noqa: F401  (first: it sets OpenMP's wait policy before torch loads)

# isort: split
import argparse
import random
import sys
import tempfile
from pathlib import Path

import torch
from batcher.adapters.hf import _backend as hf_backend
from batcher.adapters.hf._backend import HFBackend
from batcher.adapters.hf._load import embedded_model_dir

from batcher.backend import NewSequence, SamplingParams

QUESTIONS = [
    "What is the capital of France?",
    "Write a short poem about autumn leaves falling in the wind.",
    "Explain, step by step, how a refrigerator keeps food cold.",
    "Hi!",
    "List three facts about the Moon.",
    "Tell me a story about a brave little robot who wants to see the ocean.",
    "Translate 'good morning' into Spanish, French and Japanese.",
    "Why is the sky blue?",
    "Describe the taste of a ripe mango to someone who has never had one.",
    "2 + 2 = ?",
    "Give me a recipe for pancakes.",
    "What are the main differences between Python and C?",
    "Summarize the plot of Romeo and Juliet in two sentences.",
    "Name a famous painter.",
    "How do airplanes stay in the air? Explain it to a ten year old child in simple words.",
    "Écris une phrase en français sur le café.",
    "What is 17 times 23?",
    "Suggest a name for a cat.",
]


def system_prompt(tokens: int) -> str:
    """About ``tokens`` tokens of a plausible system prompt (a sentence is about 12 tokens)."""
    rule = "Answer politely, in plain words, and say so when you do not know the answer. "
    return "You are a helpful assistant. " + rule * max(1, tokens // 12)


def peaked_random_model(tokenizer_dir: str, out: Path) -> str:
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    if not (out / "config.json").exists():
        config = AutoConfig.from_pretrained(tokenizer_dir)
        config.initializer_range = 0.5
        torch.manual_seed(0)
        AutoModelForCausalLM.from_config(config, dtype=torch.float32).save_pretrained(str(out))
        AutoTokenizer.from_pretrained(tokenizer_dir).save_pretrained(str(out))
    return str(out)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cuda")
    p.add_argument("--cuda-graphs", action="store_true")
    p.add_argument("--model")
    p.add_argument("--random-weights", action="store_true")
    p.add_argument(
        "--tokenizer", help="a folder with SmolLM2's config and tokenizer (default: the embedded model)"
    )
    p.add_argument(
        "--prompts", type=int, default=18, help="the first N prompts of the schedule (CPU fallback)"
    )
    p.add_argument("--system", type=int, default=0, help="a shared system prompt of about N tokens")
    p.add_argument(
        "--cascade-min-rows",
        type=int,
        help="group decode rows sharing a prefix from this many on (default: the backend's 12; the "
        "schedule rarely has 12 live at once, so a lower value checks cascade attention here)",
    )
    args = p.parse_args()
    if args.cascade_min_rows is not None:
        hf_backend._SHARED_MIN_ROWS = args.cascade_min_rows
    model = args.model
    if args.random_weights:
        src = args.tokenizer or str(embedded_model_dir())
        model = peaked_random_model(src, Path(tempfile.gettempdir()) / "llm-batcher-peaked-smollm2")
    backend = HFBackend(model, dtype="float32", device=args.device, cuda_graphs=args.cuda_graphs)
    backend.start()
    from transformers import AutoModelForCausalLM

    plain = AutoModelForCausalLM.from_pretrained(backend._source, **backend._load_kw, dtype=torch.float32)
    plain = plain.to(backend.device).eval()
    rng = random.Random(11)
    system = [{"role": "system", "content": system_prompt(args.system)}] if args.system else []
    ids = [
        backend.tokenize([*system, {"role": "user", "content": q}] if i % 3 else q)
        for i, q in enumerate(QUESTIONS)
    ]
    seqs = [NewSequence(i, p, SamplingParams(max_tokens=rng.randrange(8, 49))) for i, p in enumerate(ids)]
    seqs = seqs[: args.prompts]
    admits = {0: seqs[0:4], 1: seqs[4:5], 3: seqs[5:9], 6: seqs[9:10], 8: seqs[10:15], 12: seqs[15:18]}
    drops = {5: [2], 9: [7], 14: [11]}
    got: dict[int, list[int]] = {s.seq_id: [] for s in seqs}
    for k in range(10_000):
        res = backend.step(admits.get(k, ()), drops.get(k, ()))
        assert not res.failed, res.failed
        for out in res.outputs:
            got[out.seq_id] += out.token_ids
        if k > max(admits) and backend.live_sequences == 0:
            break
    same = 0
    for s in seqs:
        x = torch.tensor([s.prompt_ids], device=backend.device)
        with torch.inference_mode():
            solo = plain.generate(
                x,
                attention_mask=torch.ones_like(x),
                max_new_tokens=s.params.max_tokens,
                do_sample=False,
                pad_token_id=backend.tokenizer.pad_token_id,
            )[0, x.shape[1] :].tolist()
        mine = got[s.seq_id]
        ok = mine == (solo[: len(mine)] if s.seq_id in (2, 7, 11) else solo)
        same += ok
        print(f"seq {s.seq_id:2d}: {'same' if ok else 'DIFFERENT'} ({len(mine)} tokens)")
    graphs = backend._graphs
    extra = f", {graphs.captures} graphs captured, {graphs.replays} replays" if graphs else ""
    stats = backend.prefix_stats
    extra += f"; prefix cache: {stats.hit_tokens} of {stats.lookup_tokens} prompt tokens reused"
    extra += f"; {backend.shared_prefix_steps} steps read a shared prefix once (cascade attention)"
    print(f"{same} of {len(seqs)} sequences equal their solo generate on {args.device}{extra}")
    backend.close()
    return 0 if same == len(seqs) else 1


if __name__ == "__main__":
    sys.exit(main())
