"""Text handling of HFBackend: incremental UTF-8 detokenization, stop strings, chat templates,
context limits (``prepare``)."""

from __future__ import annotations

import copy
import random
from functools import partial

import pytest
from batcher.adapters.hf._backend import HFBackend
from batcher.adapters.hf._detok import Detokenizer, decoder

from batcher import InvalidRequest, PromptTooLong
from batcher.backend import NewSequence, PreparedPrompt, PrepareRequest, SamplingParams

from .conftest import greedy, run_schedule, solo_greedy

TEXTS = [
    "Café crème, naïve façade — déjà vu.",
    "日本語のテキストと中文字符、混合。",
    "Emoji: 🎉👍🏽🇫🇷 family 👨‍👩‍👧 done",
    "  two  spaces,\ttab\nnew line and trailing ",
    "mixed: ça 日本 🎉 ok",
]


@pytest.mark.parametrize("text", TEXTS)
def test_deltas_never_split_a_character_or_lose_a_space(tiny: HFBackend, text: str) -> None:
    tok = tiny.tokenizer
    prompt = tok("Say:", add_special_tokens=False)["input_ids"]
    ids = tok(text, add_special_tokens=False)["input_ids"]
    detok = Detokenizer(tok, prompt, frozenset(tok.all_special_ids))
    deltas = [detok.feed(i) for i in ids]
    deltas.append(detok.flush())
    assert all("\ufffd" not in d for d in deltas)
    assert "".join(deltas) == text
    assert any(len(ids) > len(d) for d in deltas)  # characters really spanned several tokens


def test_the_direct_decoder_equals_the_tokenizers_decode(tiny: HFBackend) -> None:
    """Rows decode through the Rust tokenizer directly (``_detok.decoder``): the same text as
    ``tokenizer.decode`` on any ids, special ones and half characters included; a tokenizer class
    that decodes its own way keeps its own ``decode``."""
    tok, rng = tiny.tokenizer, random.Random(4)
    fast = decoder(tok)
    assert isinstance(fast, partial) and fast.func == tok.backend_tokenizer.decode
    specials = sorted(tok.all_special_ids)
    for _ in range(300):
        ids = [rng.choice(specials) if rng.random() < 0.1 else rng.randrange(len(tok)) for _ in range(9)]
        ids = ids[: rng.randrange(0, 10)]
        assert fast(ids) == tok.decode(ids, skip_special_tokens=True, clean_up_tokenization_spaces=False)

    class OwnDecode(type(tok)):  # type: ignore[misc]
        def _decode(self, token_ids: object, **kw: object) -> str:
            return "own"

    other = copy.copy(tok)
    other.__class__ = OwnDecode
    assert other.backend_tokenizer is tok.backend_tokenizer
    assert decoder(other)([1, 2]) == "own"


def test_generated_text_equals_decoding_the_generated_tokens(tiny: HFBackend) -> None:
    seqs = [NewSequence(i, [2000 + 7 * i + j for j in range(5)], greedy(40)) for i in range(4)]
    results, _ = run_schedule(tiny, {0: seqs[:2], 5: seqs[2:]})
    for r in results.values():
        assert r.text == tiny.tokenizer.decode(r.tokens, skip_special_tokens=True)


def test_stop_string_ends_the_stream_and_never_leaks(tiny: HFBackend) -> None:
    prompt = [3000, 3001, 3002]
    full = tiny.tokenizer.decode(solo_greedy(tiny, prompt, 40), skip_special_tokens=True)
    k = len(full) // 2
    stop = full[k : k + 3]
    cut = full.index(stop)
    params = SamplingParams(max_tokens=40, stop=(stop, "never-there"))
    results, _ = run_schedule(tiny, {0: [NewSequence(1, prompt, params)]})
    r = results[1]
    assert r.finish == "stop"
    assert r.text == full[:cut]
    assert stop not in r.text
    assert len(r.tokens) < 40


def test_chat_prompt_uses_the_chat_template(tiny: HFBackend) -> None:
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi, ça va? 🎉"}]
    [prepared] = tiny.prepare([PrepareRequest(messages, SamplingParams(max_tokens=5))])
    assert isinstance(prepared, PreparedPrompt)
    text = tiny.tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    assert text.endswith("<|im_start|>assistant\n")
    assert list(prepared.token_ids) == tiny.tokenizer(text, add_special_tokens=False)["input_ids"]


def test_text_prompt_tokenizes_like_the_tokenizer(tiny: HFBackend) -> None:
    [prepared] = tiny.prepare([PrepareRequest("Hello world", SamplingParams(max_tokens=5))])
    assert isinstance(prepared, PreparedPrompt)
    assert list(prepared.token_ids) == tiny.tokenizer("Hello world")["input_ids"]


def test_prompt_longer_than_the_context_is_refused(tiny: HFBackend) -> None:
    limit = tiny.max_context
    assert limit == 256
    too_long = "word " * (limit + 10)
    fits = "word " * 100
    out = tiny.prepare(
        [
            PrepareRequest(too_long, SamplingParams(max_tokens=1)),
            PrepareRequest(fits, SamplingParams(max_tokens=limit)),
            PrepareRequest(fits, SamplingParams(max_tokens=10)),
        ]
    )
    assert isinstance(out[0], PromptTooLong) and out[0].limit == limit
    assert f"{limit} tokens" in str(out[0])
    assert isinstance(out[1], PromptTooLong) and out[1].limit == limit
    assert out[1].requested == len(tiny.tokenize(fits)) + limit
    assert "lower max_tokens" in str(out[1])
    assert isinstance(out[2], PreparedPrompt)


def test_messages_without_a_chat_template_are_refused(
    tiny: HFBackend, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(tiny.tokenizer, "chat_template", None)
    [out] = tiny.prepare([PrepareRequest([{"role": "user", "content": "hi"}], SamplingParams())])
    assert isinstance(out, InvalidRequest) and "chat template" in str(out)
