"""HFBackend on the real SmolLM2-135M-Instruct (the embedded model): equivalence with solo
``generate`` in fp32, seeded sampling, the embedded-model conversion, and Batcher end to end."""

from __future__ import annotations

import asyncio
import os
import random
import subprocess
import sys
from pathlib import Path

import pytest
from batcher.adapters.hf._backend import HFBackend

from batcher import BatchConfig, Batcher
from batcher.backend import NewSequence, PreparedPrompt, PrepareRequest, SamplingParams

from .conftest import greedy, run_schedule, solo_greedy

pytestmark = pytest.mark.model

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


def _prepared(backend: HFBackend, prompts: list[object], max_tokens: int) -> list[list[int]]:
    out = backend.prepare([PrepareRequest(p, SamplingParams(max_tokens=max_tokens)) for p in prompts])  # type: ignore[arg-type]
    assert all(isinstance(o, PreparedPrompt) for o in out)
    return [list(o.token_ids) for o in out]  # type: ignore[union-attr]


def test_batched_greedy_equals_solo_generate_token_for_token(smol: HFBackend, smol_plain: object) -> None:
    rng = random.Random(11)
    prompts: list[object] = [
        [{"role": "user", "content": q}] if i % 3 else q for i, q in enumerate(QUESTIONS)
    ]
    ids = _prepared(smol, prompts, 48)
    assert len({len(x) for x in ids}) >= 10, "prompts of many different lengths"
    seqs = [NewSequence(i, p, greedy(rng.randrange(8, 49))) for i, p in enumerate(ids)]
    admits = {0: seqs[0:4], 1: seqs[4:5], 3: seqs[5:9], 6: seqs[9:10], 8: seqs[10:15], 12: seqs[15:18]}
    drops = {5: [2], 9: [7], 14: [11]}
    results, steps = run_schedule(smol, admits, drops)
    assert max(len(s.outputs) for s in steps) >= 10, "a real batch was formed"
    for s in seqs:
        r = results[s.seq_id]
        # the reference: plain transformers, solo (not the backend's packed-weights model)
        expected = solo_greedy(smol, s.prompt_ids, s.params.max_tokens, smol_plain)
        if s.seq_id in (2, 7, 11):
            assert r.finish is None and r.tokens == expected[: len(r.tokens)]
        else:
            assert r.tokens == expected, f"prompt {s.seq_id} diverged from its solo generate"
            assert r.text == smol.tokenizer.decode(
                [t for t in r.tokens if t not in smol._eos], skip_special_tokens=True
            )
    assert smol.kv_bytes == 0


def test_seeded_sampling_is_the_same_alone_and_in_a_crowd(smol: HFBackend) -> None:
    [target, *others] = _prepared(smol, ["Once upon a time", *QUESTIONS[:6]], 20)
    params = SamplingParams(max_tokens=20, temperature=0.8, top_p=0.95, top_k=40, seed=42)
    alone, _ = run_schedule(smol, {0: [NewSequence(0, target, params)]})
    warm = SamplingParams(max_tokens=20, temperature=1.0)
    crowd_seqs = [NewSequence(i + 1, p, warm) for i, p in enumerate(others)]
    crowd, _ = run_schedule(smol, {0: crowd_seqs[:3], 1: [NewSequence(0, target, params)], 2: crowd_seqs[3:]})
    assert crowd[0].tokens == alone[0].tokens
    assert len(alone[0].tokens) >= 5


async def test_end_to_end_through_batcher_stream(smol: HFBackend, smol_plain: object) -> None:
    prompts = [[{"role": "user", "content": q}] for q in QUESTIONS[:6]]
    ids = _prepared(smol, prompts, 12)  # type: ignore[arg-type]
    expected = [solo_greedy(smol, p, 12, smol_plain) for p in ids]
    # The Batcher starts (and at the end closes) its backend itself: give it a fresh one.
    backend = HFBackend(dtype="float32")
    async with Batcher(backend, BatchConfig(max_batch_size=8)) as batcher:

        async def one(p: object) -> tuple[list[int], str, str | None]:
            tokens: list[int] = []
            text = ""
            finish = None
            async with batcher.stream(p, max_tokens=12) as stream:  # type: ignore[arg-type]
                async for chunk in stream:
                    tokens += chunk.token_ids
                    text += chunk.text
                    finish = chunk.finish_reason or finish
            return tokens, text, finish

        got = await asyncio.gather(*(one(p) for p in prompts))
    for (tokens, text, finish), exp in zip(got, expected, strict=True):
        assert tokens == exp
        assert finish in ("stop", "length")
        shown = [t for t in tokens if t not in smol._eos]
        assert text == smol.tokenizer.decode(shown, skip_special_tokens=True)
    assert backend.model is None  # closed by the Batcher


def test_bfloat16_generates_sensible_text() -> None:
    backend = HFBackend(dtype="bfloat16")
    backend.start()
    try:
        [ids] = _prepared(backend, [[{"role": "user", "content": "What is the capital of France?"}]], 16)
        results, _ = run_schedule(backend, {0: [NewSequence(0, ids, greedy(16))]})
        assert "Paris" in results[0].text
    finally:
        backend.close()


def test_embedded_model_converts_once_into_a_fresh_cache(tmp_path: Path) -> None:
    """A fresh machine: ``HFBackend()`` converts the wheel's GGUF, atomically, even when two
    processes race; the second load reuses the folder."""
    code = (
        "from batcher.adapters.hf._load import embedded_model_dir; import sys; "
        "sys.stdout.write(str(embedded_model_dir()))"
    )
    env = dict(os.environ, XDG_CACHE_HOME=str(tmp_path))
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", code], env=env, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL
        )
        for _ in range(2)
    ]
    outs = [p.communicate(timeout=240)[0].decode() for p in procs]
    assert all(p.returncode == 0 for p in procs)
    assert outs[0] == outs[1]
    folder = Path(outs[0])
    assert folder.parent == tmp_path / "llm-batcher"
    assert (folder / "model.safetensors").exists() and (folder / "tokenizer.json").exists()
    leftovers = [p.name for p in folder.parent.iterdir() if not p.name.endswith(".lock")]
    assert leftovers == [folder.name], "no temporary folders left behind"


def test_a_gguf_file_is_a_model_source() -> None:
    """``HFBackend(path.gguf)``: tokenizer and config straight from the GGUF (weights, de-quantized
    by transformers, load in ``start``; not done here, it is the 20 s conversion again)."""
    from batcher.adapters.hf._load import embedded_gguf

    gguf = embedded_gguf()
    backend = HFBackend(str(gguf))
    assert backend.model_name == gguf.stem
    assert backend.max_context == 8192
    assert backend._load_kw == {"gguf_file": gguf.name}
    [out] = backend.prepare([PrepareRequest("Hello", SamplingParams(max_tokens=4))])
    assert isinstance(out, PreparedPrompt) and len(out.token_ids) >= 1
