"""The grammar layer on SmolLM2's real tokenizer: formats, masks, matchers (no model weights)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("llguidance")

from batcher.adapters.hf._grammar import (  # noqa: E402
    GrammarCompiler,
    Matcher,
    TokenMasks,
)

from batcher import InvalidRequest  # noqa: E402
from batcher.backend import ResponseFormat  # noqa: E402

EOS = 2  # <|im_end|>
SCHEMA = {
    "type": "object",
    "properties": {"name": {"type": "string"}, "age": {"type": "integer"}},
    "required": ["name", "age"],
    "additionalProperties": False,
}


@pytest.fixture(scope="module")
def tokenizer(smol_dir: Path) -> Any:
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(smol_dir))


@pytest.fixture(scope="module")
def compiler(tokenizer: Any) -> GrammarCompiler:
    return GrammarCompiler(tokenizer, vocab=len(tokenizer), eos=[EOS])


def allowed(masks: TokenMasks, matcher: Matcher) -> set[int]:
    logits = torch.zeros(1, masks.vocab)
    masks.apply(logits, [matcher])
    return set(torch.isfinite(logits[0]).nonzero().flatten().tolist())


def ids(tokenizer: Any, text: str) -> list[int]:
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])


def test_a_document_is_allowed_token_by_token_and_then_only_eos(
    tokenizer: Any, compiler: GrammarCompiler
) -> None:
    masks = TokenMasks(compiler.vocab, torch.device("cpu"))
    m = compiler.matcher(ResponseFormat.json_schema(SCHEMA))
    doc = ids(tokenizer, '{"name": "Ada", "age": 36}')
    for t in doc:
        assert not m.finished
        assert t in allowed(masks, m)
        m.advance(t)
        assert not m.error
    assert m.accepting and m.finished
    assert allowed(masks, m) == {EOS}


def test_the_first_tokens_of_a_json_object_all_start_one(tokenizer: Any, compiler: GrammarCompiler) -> None:
    masks = TokenMasks(compiler.vocab, torch.device("cpu"))
    first = allowed(masks, compiler.matcher(ResponseFormat.json_object()))
    texts = {tokenizer.decode([t]) for t in first}
    assert first and all(t.startswith("{") for t in texts)
    assert EOS not in first
    assert ids(tokenizer, '{"')[0] in first


def test_a_token_outside_the_mask_leaves_the_matcher_in_error(
    tokenizer: Any, compiler: GrammarCompiler
) -> None:
    m = compiler.matcher(ResponseFormat.json_object())
    m.advance(ids(tokenizer, "hello")[0])
    assert m.error and not m.finished and not m.accepting


def test_numbers_may_go_on_so_accepting_is_not_finished(tokenizer: Any, compiler: GrammarCompiler) -> None:
    schema = {"type": "object", "properties": {"n": {"type": "integer"}}, "required": ["n"]}
    m = compiler.matcher(ResponseFormat.json_schema(schema))
    for t in ids(tokenizer, '{"n": 1'):
        m.advance(t)
    assert not m.accepting  # the object is still open
    m.advance(ids(tokenizer, "}")[0])
    assert m.accepting and m.finished


def test_masks_leave_unconstrained_rows_untouched(tokenizer: Any, compiler: GrammarCompiler) -> None:
    masks = TokenMasks(compiler.vocab, torch.device("cpu"), rows=1)  # grows to 2 below
    torch.manual_seed(0)
    logits = torch.randn(4, compiler.vocab)
    before = logits.clone()
    rows: list[Matcher | None] = [
        None,
        compiler.matcher(ResponseFormat.json_object()),
        None,
        compiler.matcher(ResponseFormat.json_schema(SCHEMA)),
    ]
    out = masks.apply(logits, rows)
    assert out is logits  # in place
    assert torch.equal(logits[0], before[0]) and torch.equal(logits[2], before[2])
    for r in (1, 3):
        kept = torch.isfinite(logits[r])
        assert 0 < int(kept.sum()) < compiler.vocab // 10
        assert torch.equal(logits[r][kept], before[r][kept])  # allowed tokens keep their logits
    # both rows start an object: the schema's row allows a subset of the free object's
    assert set(kept.nonzero().flatten().tolist()) <= set(
        torch.isfinite(logits[1]).nonzero().flatten().tolist()
    )


def test_a_batch_without_a_grammar_is_returned_as_is(compiler: GrammarCompiler) -> None:
    masks = TokenMasks(compiler.vocab, torch.device("cpu"))
    logits = torch.randn(3, compiler.vocab)
    before = logits.clone()
    assert masks.apply(logits, [None, None, None]) is logits
    assert torch.equal(logits, before)


def test_ids_beyond_the_tokenizer_are_never_allowed(tokenizer: Any) -> None:
    wide = len(tokenizer) + 64  # a model whose embedding is padded past its tokenizer
    compiler = GrammarCompiler(tokenizer, vocab=wide, eos=[EOS])
    m = compiler.matcher(ResponseFormat.json_object())
    for t in ids(tokenizer, '{"a": 1}'):
        m.advance(t)
    logits = torch.zeros(1, wide)
    TokenMasks(wide, torch.device("cpu")).apply(logits, [m])
    assert torch.isinf(logits[0, len(tokenizer) :]).all()
    assert torch.isfinite(logits[0, EOS])


def test_equal_formats_share_one_compiled_grammar(tokenizer: Any, compiler: GrammarCompiler) -> None:
    a = ResponseFormat.json_schema({"type": "object", "properties": {"q": {"type": "string"}}})
    b = ResponseFormat.json_schema({"type": "object", "properties": {"q": {"type": "string"}}})
    assert a == b and hash(a) == hash(b)
    compiler.check(a)
    assert compiler._pristine(a) is compiler._pristine(b)
    m1, m2 = compiler.matcher(a), compiler.matcher(b)
    m1.advance(ids(tokenizer, '{"')[0])
    assert not m1.error and not m2.error  # copies: advancing one leaves the other at the start


@pytest.mark.parametrize(
    ("schema", "words"),
    [
        ({"type": "objekt"}, "objekt"),
        ({"type": "object", "properties": {"a": {"$ref": "#/nowhere"}}}, "nowhere"),
        ({"type": "string", "pattern": "(("}, "regex"),
        ({"type": "string", "format": "shoe-size"}, "shoe-size"),
    ],
)
def test_a_schema_that_does_not_compile_is_an_invalid_request(
    compiler: GrammarCompiler, schema: dict[str, Any], words: str
) -> None:
    with pytest.raises(InvalidRequest, match=words) as info:
        compiler.check(ResponseFormat.json_schema(schema))
    assert info.value.field == "response_format"


def test_a_tool_call_names_one_tool_and_holds_its_arguments(
    tokenizer: Any, compiler: GrammarCompiler
) -> None:
    weather = {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}
    fmt = ResponseFormat.tool_call([("get_weather", weather), ("get_time", {})])
    good = '{"name": "get_time", "arguments": {}}'
    m = compiler.matcher(fmt)
    for t in ids(tokenizer, good):
        m.advance(t)
    assert m.finished
    bad = compiler.matcher(fmt)  # an unknown tool name cannot be spelled
    for t in ids(tokenizer, '{"name": "get_x'):
        bad.advance(t)
    assert bad.error
    missing = compiler.matcher(fmt)  # get_weather's arguments need their city
    for t in ids(tokenizer, '{"name": "get_weather", "arguments": {}'):
        missing.advance(t)
    assert missing.error


def test_the_host_and_device_unpackings_agree() -> None:
    """The GPU path (torch ops) runs here on the CPU: it bans exactly the host path's tokens."""
    from batcher.adapters.hf._grammar import banned_on_device, banned_on_host

    torch.manual_seed(1)
    words = torch.randint(-(2**31), 2**31 - 1, (3, 5), dtype=torch.int32)
    byte_bits = torch.tensor([1 << i for i in range(8)], dtype=torch.uint8)
    host, device = banned_on_host(words, 150), banned_on_device(words, byte_bits, 150)
    assert host.shape == (3, 150) and torch.equal(host, device)
    for r, w, b in ((0, 0, 0), (1, 2, 17), (2, 4, 21)):  # token 32 w + b: bit b of word w
        assert bool(host[r, 32 * w + b]) == (not (int(words[r, w]) >> b) & 1)
