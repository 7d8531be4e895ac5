"""Refusal by size before tokenizing: the bound is derived from the context, never refuses a prompt
that fits (checked against the real tokenizer), and the body limit follows from it."""

from __future__ import annotations

import time
from collections.abc import Iterator
from typing import Any

import httpx
import pytest
from batcher.adapters.server._app import ServerSettings
from batcher.adapters.server._limits import BODY_SLACK, FALLBACK_CHARS_PER_TOKEN, PromptLimits
from hypothesis import given, settings
from hypothesis import strategies as st

from batcher import PromptTooLong

from .conftest import Server, metric

# The fake backend: a 4096-token context and no vocabulary.
FAKE_CHARS = 4095 * FALLBACK_CHARS_PER_TOKEN
FAKE_BODY = 2 * FAKE_CHARS + BODY_SLACK


async def test_a_prompt_over_the_character_bound_is_refused_before_the_backend(fake_server: Server) -> None:
    async with httpx.AsyncClient(base_url=fake_server.url, timeout=30) as http:
        before = metric((await http.get("/metrics")).text, "batcher_requests_total", outcome="rejected")
        r = await http.post("/v1/completions", json={"prompt": "x" * (FAKE_CHARS + 1), "max_tokens": 2})
        assert r.status_code == 400 and r.json()["error"]["code"] == "context_length_exceeded"
        assert f"more than the {FAKE_CHARS}" in r.json()["error"]["message"]
        chat = {"messages": [{"role": "user", "content": "y" * (FAKE_CHARS // 2 + 1)}] * 2, "max_tokens": 2}
        r = await http.post("/v1/chat/completions", json=chat)
        assert r.status_code == 400 and r.json()["error"]["param"] == "messages"
        # At the bound it goes through (for the fake backend, one long word is one token).
        r = await http.post("/v1/completions", json={"prompt": "x" * FAKE_CHARS, "max_tokens": 2})
        assert r.status_code == 200, r.text
        after = metric((await http.get("/metrics")).text, "batcher_requests_total", outcome="rejected")
        assert after - before == 2
        r = await http.post("/v1/completions", content=b" " * (FAKE_BODY + 1))
        assert r.status_code == 413 and str(FAKE_BODY) in r.json()["error"]["message"]


@pytest.fixture(scope="module")
def smollm2() -> Iterator[Any]:
    pytest.importorskip("torch")
    from batcher.adapters.hf import HFBackend

    yield HFBackend()


texts = st.text(
    alphabet=st.sampled_from(
        list(" \n\t#=-_*abcdefghijklmnopqrstuvwxyzABCXYZ0123456789.,'\"éüß中文字😀\u200b")
    ),
    min_size=1,
    max_size=3000,
) | st.builds(
    lambda c, n: c * n, st.sampled_from([" ", "\n", "#", "=", "-", "ab", "\n    "]), st.integers(1, 3000)
)


@pytest.mark.model
@settings(max_examples=150, deadline=None, database=None)
@given(text=texts)
def test_the_token_lower_bound_never_exceeds_the_real_count(smollm2: Any, text: str) -> None:
    limits = PromptLimits.for_backend(smollm2, ServerSettings())
    assert limits.widths is not None
    assert limits.widths.min_tokens(text) <= len(smollm2.tokenize(text))


@pytest.mark.model
def test_smollm2_bounds_refuse_a_megabyte_quickly_and_keep_what_fits(smollm2: Any) -> None:
    limits = PromptLimits.for_backend(smollm2, ServerSettings())
    assert limits.context == smollm2.max_context == 8192
    assert limits.max_prompt_chars == (8192 - 1) * limits.widths.longest  # type: ignore[union-attr]
    assert limits.max_body_bytes == 2 * limits.max_prompt_chars + BODY_SLACK
    english = "The quick brown fox jumps over the lazy dog, again and again. " * 16_000  # ~1 MB
    started = time.perf_counter()
    with pytest.raises(PromptTooLong):
        limits.check(english)
    took = time.perf_counter() - started
    print(f"refused {len(english)} characters in {took * 1000:.1f} ms")
    fits = english[:20_000]  # about 4,400 tokens
    assert len(smollm2.tokenize(fits)) < 8191
    limits.check(fits)
    # 600k spaces are 9,375 tokens, but the bound (81 per token: 7,407) cannot prove it, so the
    # tokenizer decides: the check only refuses what surely cannot fit.
    limits.check(" " * 600_000)
    half = english[:500_000]
    started = time.perf_counter()
    with pytest.raises(PromptTooLong, match="needs at least"):
        limits.check(half)
    print(f"counted {len(half)} characters in {(time.perf_counter() - started) * 1000:.1f} ms")
