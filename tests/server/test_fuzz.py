"""Fuzzing the HTTP API: schemathesis from the app's OpenAPI schema, and random bodies
(hypothesis + httpx). The property: no 5xx, no hang (every answer within a timeout), and every
error has the OpenAI error shape. Example counts are bounded to keep the suite fast."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import schemathesis
from batcher.adapters.server._app import ServerSettings, create_app
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from schemathesis.checks import not_a_server_error

from .conftest import Server, start_server

TIMEOUT = 10.0  # no answer within this is a hang
FUZZ = settings(max_examples=60, deadline=None, database=None, suppress_health_check=list(HealthCheck))


@pytest.fixture(scope="module")
def fuzz_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    # Fast fake steps and a small max_tokens limit: a valid random request finishes at once.
    s = start_server(
        tmp_path_factory.mktemp("fuzz"),
        "--model",
        "fake",
        "--fake-step",
        "0",
        "--fake-step-per-seq",
        "0",
        "--max-tokens-limit",
        "64",
        "--default-max-tokens",
        "16",
        "--default-deadline",
        "5",
    )
    yield s
    assert s.stop() == 0, s.output()[-3000:]


# The schema the server serves at /openapi.json, built from the app itself (no server needed to
# collect the tests); the requests go to the real server process.
schema = schemathesis.openapi.from_dict(create_app(ServerSettings(model="fake")).app.openapi())


@schema.parametrize()
@FUZZ
def test_schemathesis_no_server_errors(case: Any, fuzz_server: Server) -> None:
    response = case.call(base_url=fuzz_server.url, timeout=TIMEOUT)
    case.validate_response(response, checks=[not_a_server_error])


@pytest.fixture(scope="module")
def http(fuzz_server: Server) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=fuzz_server.url, timeout=TIMEOUT) as c:
        yield c


def check(r: httpx.Response) -> None:
    assert r.status_code < 500, r.text
    if r.status_code >= 400:
        assert set(r.json()["error"]) == {"message", "type", "param", "code"}


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=20),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
    max_leaves=12,
)
FIELDS = [
    "prompt",
    "messages",
    "max_tokens",
    "temperature",
    "top_p",
    "top_k",
    "seed",
    "stop",
    "n",
    "stream",
    "stream_options",
    "echo",
    "logprobs",
    "max_completion_tokens",
    "model",
]
bodies = st.dictionaries(st.sampled_from(FIELDS), json_values, max_size=8) | json_values


@given(raw=st.binary(max_size=300), path=st.sampled_from(["/v1/completions", "/v1/chat/completions"]))
@FUZZ
def test_random_bytes(http: httpx.Client, raw: bytes, path: str) -> None:
    check(http.post(path, content=raw, headers={"content-type": "application/json"}))


@given(body=bodies, path=st.sampled_from(["/v1/completions", "/v1/chat/completions"]))
@FUZZ
def test_random_json_bodies(http: httpx.Client, body: Any, path: str) -> None:
    check(http.post(path, content=json.dumps(body), headers={"content-type": "application/json"}))


@pytest.mark.parametrize(
    "raw",
    [
        b"[" * 100_000,
        b'{"prompt": ' * 50_000,
        b'{"prompt": "x", "temperature": NaN}',
        b'{"prompt": "x", "top_p": Infinity}',
        b'{"prompt": "x", "max_tokens": 1' + b"0" * 4000 + b"}",
        b'{"prompt": "x", "seed": 18446744073709551616}',
        b'{"prompt": "\\ud800"}',
        '{"prompt": "\u00e9\u4e2d\U0001f600"}'.encode(),
        b'{"prompt": "x", "prompt": 5}',
    ],
)
def test_adversarial_bodies(http: httpx.Client, raw: bytes) -> None:
    for path in ("/v1/completions", "/v1/chat/completions"):
        check(http.post(path, content=raw, headers={"content-type": "application/json"}))


def test_the_server_still_answers_after_fuzzing(http: httpx.Client, fuzz_server: Server) -> None:
    r = http.post("/v1/completions", json={"prompt": "still alive", "max_tokens": 3})
    assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 3
    assert "Traceback" not in Path(fuzz_server.log).read_text(errors="replace")
