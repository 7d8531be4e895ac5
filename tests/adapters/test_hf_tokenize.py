"""Tokenizing with a cap and a tokenizer per thread: a prompt far over the context is refused
after a bounded prefix, the piecewise bound never over-counts, a prompt that fits gets exactly its
ids, and a small prompt's prepare does not wait for a huge one tokenizing on another thread."""

from __future__ import annotations

import random
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from batcher.adapters.hf._backend import HFBackend
from batcher.adapters.hf._tokenize import PIECE, SLACK, encode_capped, pieces

from batcher import PromptTooLong
from batcher.backend import PrepareRequest, SamplingParams

WORDS = "the of sea ship storm lighthouse keeper und über 日本語 café naïve 123 4567 ( ) { } ;".split()


@pytest.fixture(scope="module")
def smol_host(smol_dir: Path) -> Iterator[HFBackend]:
    """SmolLM2's backend before ``start``: tokenizer and context only (no weights)."""
    yield HFBackend(str(smol_dir), dtype="float32")


def _fill(rng: random.Random, parts: list[str], chars: int) -> str:
    out: list[str] = []
    size = 0
    while size < chars:
        out.append(rng.choice(parts))
        size += len(out[-1])
    return "".join(out)[:chars]


def _texts(rng: random.Random, chars: int) -> dict[str, str]:
    return {
        "words": _fill(rng, [w + " " for w in WORDS], chars),
        "code": _fill(rng, ["    ", "\n", "x = f(y)", "  ", "\t", "if a:", "# c"], chars),
        "cjk": _fill(rng, list("日本語の文章です。"), chars),
        "no spaces": _fill(rng, list("abcdefgh"), chars),
        "space runs": _fill(rng, [" " * rng.randint(1, 90), "a", "b."], chars),
    }


@pytest.mark.parametrize("seed", [0, 1])
def test_the_piecewise_count_never_exceeds_the_whole_count(smol_host: HFBackend, seed: int) -> None:
    tok = smol_host.tokenizer
    for kind, text in _texts(random.Random(seed), 3 * PIECE + 999).items():
        cuts = pieces(text)
        assert len(cuts) == 4 and "".join(text[a:b] for a, b in cuts) == text
        counted = sum(len(tok(text[a:b], add_special_tokens=False)["input_ids"]) for a, b in cuts)
        whole = len(tok(text, add_special_tokens=False)["input_ids"])
        assert counted - SLACK * (len(cuts) - 1) <= whole, kind


def test_a_prompt_far_over_the_context_is_refused_after_a_bounded_prefix(smol_host: HFBackend) -> None:
    huge = "the sea and the ship, " * 100_000  # 2.2M characters, about 600k tokens
    (got,) = smol_host.prepare([PrepareRequest(huge, SamplingParams(max_tokens=4))])
    assert isinstance(got, PromptTooLong) and got.requested is not None
    assert got.requested > smol_host.max_context - 1
    stopped_at = int(str(got).split("at character ")[1].split(" ")[0])
    assert stopped_at <= 3 * PIECE < len(huge) // 40
    chat = [{"role": "user", "content": huge}]
    (got_chat,) = smol_host.prepare([PrepareRequest(chat, SamplingParams(max_tokens=4))])
    assert isinstance(got_chat, PromptTooLong) and got_chat.field == "messages"


def test_a_long_prompt_that_fits_gets_exactly_its_ids(smol_host: HFBackend) -> None:
    text = " ship" * 7_000  # 35k characters, 7k tokens: tokenized in pieces, then whole
    assert len(text) > 2 * PIECE
    ids = smol_host.tokenize(text)
    assert ids == list(smol_host.tokenizer(text)["input_ids"]) and len(ids) < smol_host.max_context
    with pytest.raises(PromptTooLong):
        encode_capped(smol_host.tokenizer, text, limit=6_000, what="prompt")


class _Gate:
    """A thread's tokenizer that signals when it is called and waits to be released."""

    def __init__(self, tokenizer: Any) -> None:
        self.tokenizer, self.entered, self.release = tokenizer, threading.Event(), threading.Event()

    def __getattr__(self, name: str) -> Any:
        return getattr(self.tokenizer, name)

    def __call__(self, *args: Any, **kw: Any) -> Any:
        self.entered.set()
        assert self.release.wait(30)
        return self.tokenizer(*args, **kw)


def test_a_small_prepare_finishes_while_a_huge_one_is_tokenizing(smol_host: HFBackend) -> None:
    results: list[object] = []
    gate = _Gate(smol_host.tokenizer)

    def huge() -> None:
        gate.tokenizer = smol_host._tokenizers.get()  # this thread's own tokenizer, gated
        smol_host._tokenizers._local.tokenizer = gate
        results.extend(smol_host.prepare([PrepareRequest("word " * 400_000, SamplingParams())]))

    worker = threading.Thread(target=huge)
    worker.start()
    try:
        assert gate.entered.wait(30)  # the huge prompt is being tokenized now
        (small,) = smol_host.prepare([PrepareRequest("a small prompt", SamplingParams(max_tokens=4))])
        assert not isinstance(small, Exception) and len(small.token_ids) == 3
        assert worker.is_alive()  # the huge one is still in its tokenizer
    finally:
        gate.release.set()
        worker.join(30)
    assert isinstance(results[0], PromptTooLong)
