"""HFBackend with response_format: constrained rows beside free ones, ending, refusals (real SmolLM2).

The backend masks the constrained rows' logits each step (``_grammar``); a free row in the same
batch must get exactly the tokens it gets alone, and a constrained one ends with "stop" on its
last token (the closing brace), without a step spent on EOS.
"""

from __future__ import annotations

import json

import pytest

pytest.importorskip("llguidance")

from batcher.adapters.hf._backend import HFBackend

from batcher import InvalidRequest
from batcher.backend import NewSequence, PrepareRequest, ResponseFormat, SamplingParams

from .conftest import run_schedule, solo_greedy

pytestmark = pytest.mark.model
QUESTION = [
    {"role": "system", "content": "Reply with one short JSON object."},
    {"role": "user", "content": "Give the capital of France as JSON with the key capital."},
]
SCHEMA = {
    "type": "object",
    "properties": {"capital": {"type": "string", "enum": ["Paris", "Lyon"]}},
    "required": ["capital"],
    "additionalProperties": False,
}


def test_free_rows_are_untouched_and_constrained_ones_end_on_their_last_token(smol: HFBackend) -> None:
    ids = smol.tokenize(QUESTION)
    free = SamplingParams(max_tokens=24)
    obj = SamplingParams(max_tokens=60, response_format=ResponseFormat.json_object())
    schema = SamplingParams(max_tokens=60, response_format=ResponseFormat.json_schema(SCHEMA))
    admits = {0: [NewSequence(1, ids, free), NewSequence(2, ids, obj)], 2: [NewSequence(3, ids, schema)]}
    results, _ = run_schedule(smol, admits)
    assert results[1].tokens == solo_greedy(smol, ids, 24)
    assert not results[1].text.startswith("{")  # unconstrained, SmolLM2 does not answer bare JSON
    for seq in (2, 3):
        r = results[seq]
        assert r.finish == "stop" and r.tokens[-1] not in smol._eos, r
        assert r.text.endswith("}")
    assert isinstance(json.loads(results[2].text), dict)
    assert json.loads(results[3].text) in ({"capital": "Paris"}, {"capital": "Lyon"})
    assert smol._constrained == 0  # every constrained row left


def test_a_resumed_constrained_row_continues_its_object(smol: HFBackend) -> None:
    """After a failed step the engine re-admits a sequence with its generated tokens appended to
    the prompt: the grammar resumes after them instead of starting a new object."""
    ids = smol.tokenize(QUESTION)
    params = SamplingParams(max_tokens=60, response_format=ResponseFormat.json_object())
    whole, _ = run_schedule(smol, {0: [NewSequence(1, ids, params)]})
    done = whole[1].tokens[:3]  # '{"', 'capital', '":' or the like: inside the object
    rest = SamplingParams(max_tokens=57, response_format=ResponseFormat.json_object())
    resumed, _ = run_schedule(smol, {0: [NewSequence(2, [*ids, *done], rest, resumed=3)]})
    text = smol.tokenizer.decode(done) + resumed[2].text
    assert resumed[2].finish == "stop" and isinstance(json.loads(text), dict), text


def test_max_tokens_cuts_a_constrained_row_with_length(smol: HFBackend) -> None:
    params = SamplingParams(max_tokens=3, response_format=ResponseFormat.json_object())
    results, _ = run_schedule(smol, {0: [NewSequence(1, smol.tokenize(QUESTION), params)]})
    assert results[1].finish == "length" and len(results[1].tokens) == 3
    assert results[1].text.startswith("{")


def test_a_schema_that_does_not_compile_is_refused_by_prepare(smol: HFBackend) -> None:
    bad = SamplingParams(
        response_format=ResponseFormat.json_schema({"type": "string", "format": "shoe-size"})
    )
    good = SamplingParams(response_format=ResponseFormat.json_object())
    out = smol.prepare([PrepareRequest("x", bad), PrepareRequest("x", good)])
    assert isinstance(out[0], InvalidRequest) and out[0].field == "response_format"
    assert "shoe-size" in str(out[0])
    assert not isinstance(out[1], InvalidRequest)
