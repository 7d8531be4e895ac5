"""Structured output from the real SmolLM2-135M-Instruct, through the grammar layer.

The loop here is the tests' own (transformers' model with its own cache, batched, left-padded):
it does per step what the backend does, masking every constrained row's logits in one call,
choosing, advancing each row's matcher, and ending a row when its matcher is finished or it
samples EOS. The prompts ask for small objects: the grammar makes every finished output valid,
but greedy decoding of a 135M model can loop inside a string until ``max_tokens`` (an output cut
there ends with "length" and is incomplete, as with OpenAI's JSON mode).
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("llguidance")
jsonschema = pytest.importorskip("jsonschema")

from batcher.adapters.hf._grammar import (  # noqa: E402
    GrammarCompiler,
    TokenMasks,
)

from batcher.backend import ResponseFormat  # noqa: E402

CASES = json.loads((Path(__file__).parents[1] / "structured_cases.json").read_text())
SYSTEM: str = CASES["system"]
OBJECT_PROMPTS: list[str] = CASES["object_prompts"]
PERSON: dict[str, Any] = CASES["person"]
TOOLS: dict[str, dict[str, Any]] = CASES["tools"]

pytestmark = [pytest.mark.model, pytest.mark.slow]

EOS = 2  # <|im_end|>


@dataclass
class Out:
    tokens: list[int] = field(default_factory=list)
    finish: str | None = None
    error: str = ""


@pytest.fixture(scope="module")
def model_and_tokenizer(smol_dir: Path) -> tuple[Any, Any]:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(smol_dir))
    model = AutoModelForCausalLM.from_pretrained(str(smol_dir), dtype=torch.float32).eval()
    return model, tok


def generate(
    model: Any,
    tok: Any,
    chats: Sequence[list[dict[str, str]]],
    formats: Sequence[ResponseFormat | None],
    *,
    max_tokens: int,
    temperature: float = 0.0,
    seed: int = 0,
) -> list[tuple[str, Out]]:
    """Generate for every chat at once, each row under its format (None: free text)."""
    from transformers import DynamicCache

    vocab = model.get_output_embeddings().weight.shape[0]
    compiler = GrammarCompiler(tok, vocab=vocab, eos=[EOS])
    masks = TokenMasks(vocab, torch.device("cpu"), rows=4)  # grows with the batch
    matchers = [compiler.matcher(f) if f is not None else None for f in formats]
    prompts = [
        list(tok.apply_chat_template(c, add_generation_prompt=True, return_dict=True)["input_ids"])
        for c in chats
    ]
    width = max(map(len, prompts))
    ids = torch.tensor([[EOS] * (width - len(p)) + p for p in prompts])
    attention = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts])
    outs = [Out() for _ in chats]
    generator = torch.Generator().manual_seed(seed)
    kv = DynamicCache()
    with torch.inference_mode():
        while any(o.finish is None for o in outs):
            positions = (attention.cumsum(-1) - 1).clamp(min=0)[:, -ids.shape[1] :]
            result = model(
                input_ids=ids, attention_mask=attention, position_ids=positions, cache=kv, use_cache=True
            )
            logits = result.logits[:, -1].float()
            masks.apply(
                logits, [m if o.finish is None else None for m, o in zip(matchers, outs, strict=True)]
            )
            if temperature:
                probs = torch.softmax(logits / temperature, dim=-1)
                tokens = torch.multinomial(probs, 1, generator=generator).flatten().tolist()
            else:
                tokens = logits.argmax(-1).tolist()
            for o, m, t in zip(outs, matchers, tokens, strict=True):
                if o.finish is None:
                    advance(o, m, t, max_tokens)
            ids = torch.tensor(tokens).unsqueeze(1)
            attention = torch.cat([attention, torch.ones_like(attention[:, :1])], dim=1)
    return [(tok.decode([t for t in o.tokens if t != EOS]), o) for o in outs]


def advance(out: Out, matcher: Any, token: int, max_tokens: int) -> None:
    out.tokens.append(token)
    if token == EOS:
        out.finish = "stop"
        return
    if matcher is not None:
        matcher.advance(token)
        if matcher.error:
            out.finish, out.error = "error", matcher.error
            return
        if matcher.finished:
            out.finish = "stop"
            return
    if len(out.tokens) >= max_tokens:
        out.finish = "length"


def chat(user: str) -> list[dict[str, str]]:
    return [{"role": "system", "content": SYSTEM}, {"role": "user", "content": user}]


def test_json_object_output_parses_for_20_prompts(model_and_tokenizer: tuple[Any, Any]) -> None:
    model, tok = model_and_tokenizer
    chats = [chat(p) for p in OBJECT_PROMPTS]
    results = generate(model, tok, chats, [ResponseFormat.json_object()] * len(chats), max_tokens=80)
    for prompt, (text, out) in zip(OBJECT_PROMPTS, results, strict=True):
        assert out.finish == "stop", (prompt, text, out)
        assert isinstance(json.loads(text), dict), (prompt, text)
    assert len({text for text, _ in results}) >= 15  # varied prompts, varied answers


def test_free_text_rows_share_the_batch_unconstrained(model_and_tokenizer: tuple[Any, Any]) -> None:
    """Without a format SmolLM2 does not answer in bare JSON: the mask is what makes the JSON."""
    model, tok = model_and_tokenizer
    prompt = [chat(OBJECT_PROMPTS[0])] * 2
    (free, _), (constrained, out) = generate(
        model, tok, prompt, [None, ResponseFormat.json_object()], max_tokens=40
    )
    assert out.finish == "stop" and json.loads(constrained)
    assert free != constrained and not free.startswith("{")


def test_json_schema_output_validates_when_sampled(model_and_tokenizer: tuple[Any, Any]) -> None:
    model, tok = model_and_tokenizer
    users = [
        "Invent a person who lives in Paris.",
        "Describe a retired teacher from Tokyo as JSON.",
        "A young footballer from London, please.",
        "Make up someone who likes chess and cooking.",
        "Describe yourself.",
        "Create a fictional scientist.",
    ]
    fmt = ResponseFormat.json_schema(PERSON)
    results = generate(
        model, tok, [chat(u) for u in users], [fmt] * len(users), max_tokens=120, temperature=0.7, seed=3
    )
    for user, (text, out) in zip(users, results, strict=True):
        assert out.finish == "stop", (user, text, out)
        jsonschema.validate(json.loads(text), PERSON)


def test_a_tool_call_names_one_tool_with_valid_arguments(model_and_tokenizer: tuple[Any, Any]) -> None:
    model, tok = model_and_tokenizer
    users = ["What's the weather like in Berlin?", "What time is it in Tokyo?", "Is it cold in Oslo today?"]
    fmt = ResponseFormat.tool_call(list(TOOLS.items()))
    system = "You call one of the tools get_weather(city, unit) and get_time(timezone), as JSON."
    chats = [[{"role": "system", "content": system}, {"role": "user", "content": u}] for u in users]
    results = generate(model, tok, chats, [fmt] * len(chats), max_tokens=80)
    for user, (text, out) in zip(users, results, strict=True):
        assert out.finish == "stop", (user, text, out)
        call = json.loads(text)
        assert set(call) == {"name", "arguments"} and call["name"] in TOOLS, text
        jsonschema.validate(call["arguments"], TOOLS[call["name"]])
