"""The CLI's flags and environment, and the load generator against a fake server."""

from __future__ import annotations

import importlib.metadata
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
from batcher.adapters._cli import parse_settings
from batcher.adapters.server._auth import KeyRing, parse_key_file

from batcher import InvalidRequest

from .conftest import ROOT, Server, free_port


def test_flags_environment_and_defaults() -> None:
    s = parse_settings(["serve"], env={})
    assert (s.host, s.port, s.model, s.api_keys) == ("127.0.0.1", 8000, None, ())
    env = {
        "LLM_BATCHER_PORT": "9001",
        "LLM_BATCHER_MAX_QUEUE": "7",
        "LLM_BATCHER_MODEL": "fake",
        "LLM_BATCHER_API_KEY": "k",
        "LLM_BATCHER_DEFAULT_DEADLINE": "2.5",
    }
    s = parse_settings(
        [
            "serve",
            "--max-queue",
            "9",
            "--batch-window",
            "0.01",
            "--max-batch-tokens",
            "4096",
            "--drain-timeout",
            "3",
        ],
        env=env,
    )
    assert (s.port, s.model, s.default_deadline_s) == (9001, "fake", 2.5)
    assert [(k.key, k.tenant, k.weight) for k in s.api_keys] == [("k", "default", 1.0)]
    assert s.batch.max_queue == 9  # the flag beats the variable
    assert (s.batch.batch_window_s, s.batch.max_batch_tokens, s.batch.drain_timeout_s) == (0.01, 4096, 3.0)


@pytest.mark.parametrize(
    ("argv", "env"),
    [
        (["serve", "--max-batch-size", "0"], {}),
        (["serve"], {"LLM_BATCHER_PORT": "eighty"}),
        (["serve", "--port", "x"], {}),
    ],
)
def test_bad_settings_exit_with_a_message(
    argv: list[str], env: dict[str, str], capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as e:
        parse_settings(argv, env=env)
    assert e.value.code == 2
    assert capsys.readouterr().err


def run_cli(
    *args: str, env: dict[str, str] | None = None, timeout: float = 60
) -> subprocess.CompletedProcess[str]:
    full_env = {k: v for k, v in os.environ.items() if not k.startswith("LLM_BATCHER_")} | (env or {})
    cmd = [sys.executable, "-m", "batcher.adapters._cli", *args]
    return subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=timeout, env=full_env)


def test_version_and_help_with_defaults() -> None:
    r = run_cli("--version")
    assert (
        r.returncode == 0 and r.stdout.strip() == f"llm-batcher {importlib.metadata.version('llm-batcher')}"
    )
    r = run_cli("serve", "--help")
    assert r.returncode == 0
    help_text = " ".join(r.stdout.split())
    for shown in (
        "(default: 8000)",
        "(default: 127.0.0.1)",
        "(default: 10.0)",
        "(default: 1024)",
        "[env LLM_BATCHER_API_KEY_FILE]",
    ):
        assert shown in help_text, shown


@pytest.mark.parametrize(
    ("args", "env", "message"),
    [
        (["--model", "./no/such/dir"], {}, "no such folder: ./no/such/dir"),
        (["--model", "/tmp/none-here.gguf"], {}, "no such file: /tmp/none-here.gguf"),
        (["--model", "nothing-here"], {}, "no such folder: nothing-here"),
        (["--api-key", ""], {}, "--api-key is empty"),
        ([], {"LLM_BATCHER_API_KEY": ""}, "LLM_BATCHER_API_KEY is empty"),
        (["--api-key-file", "/no/such/keys"], {}, "cannot read the API key file /no/such/keys"),
        (["--max-connections", "0"], {}, "max_connections must be >= 1"),
    ],
)
def test_bad_startup_settings_are_one_line(args: list[str], env: dict[str, str], message: str) -> None:
    r = run_cli("serve", *args, env=env)
    assert r.returncode == 2
    assert message in r.stderr and "Traceback" not in r.stderr
    assert len(r.stderr.strip().splitlines()) == 2  # usage, then the error


def test_api_key_file_tenants_and_weights(tmp_path: Path) -> None:
    keys = tmp_path / "keys"
    keys.write_text("# key tenant weight\nk-one team-a 3\n\nk-two team-b  # weight 1\nk-three\n")
    s = parse_settings(["serve", "--api-key-file", str(keys)], env={"LLM_BATCHER_API_KEY": "k-env"})
    got = [(k.key, k.tenant, k.weight) for k in s.api_keys]
    assert got == [
        ("k-one", "team-a", 3.0),
        ("k-two", "team-b", 1.0),
        ("k-three", "default", 1.0),
        ("k-env", "default", 1.0),
    ]
    assert "k-one" not in repr(s.api_keys)  # keys never print
    for bad, why in (
        ("k a b c\n", "expected 'key [tenant] [weight]'"),
        ("k t -1\n", "weight"),
        ("k bad/tenant\n", "tenant"),
        ("# none\n", "holds no API key"),
        ("k\nk\n", "twice"),
    ):
        keys.write_text(bad)
        with pytest.raises(InvalidRequest, match=re.escape(why)):
            KeyRing(parse_key_file(keys))


@pytest.mark.slow
def test_a_model_that_fails_to_load_exits_1_with_one_line(tmp_path: Path) -> None:
    r = run_cli("serve", "--port", str(free_port()), "--model", str(tmp_path), timeout=180)
    assert r.returncode == 1
    errors = [line for line in r.stderr.splitlines() if "ERROR" in line]
    assert len(errors) == 1 and "could not load the model" in errors[0], r.stderr[-2000:]
    assert "Traceback" not in r.stderr


def test_loadgen_smoke(fake_server: Server, tmp_path: Path) -> None:
    png, out = tmp_path / "run.png", tmp_path / "run.json"
    prompts = tmp_path / "prompts.txt"
    prompts.write_text('first prompt\n\n{"prompt": "second prompt"}\nthird\n')
    cmd = [
        sys.executable,
        "examples/loadgen.py",
        "--url",
        fake_server.url,
        "--requests",
        "24",
        "--concurrency",
        "6",
        "--max-tokens",
        "8",
        "--prompts",
        str(prompts),
        "--out",
        str(png),
        "--json",
        str(out),
        "--duration",
        "60",
    ]
    r = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    for row in ("output tokens/s", "TTFT", "end-to-end", "p50", "p99", "errors by status"):
        assert row in r.stdout
    assert "24/24" in r.stderr  # the tqdm bar
    summary = json.loads(out.read_text())
    assert summary["ok"] == 24 and summary["output_tokens"] == 24 * 8
    assert summary["ttft_p50_s"] <= summary["e2e_p50_s"]
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_loadgen_poisson_chat_and_error_counts(fake_server: Server, tmp_path: Path) -> None:
    prompts = tmp_path / "p.txt"
    prompts.write_text("fine\nplease REJECT this\n")
    cmd = [
        sys.executable,
        "examples/loadgen.py",
        "--url",
        fake_server.url,
        "--requests",
        "10",
        "--rate",
        "50",
        "--chat",
        "--max-tokens",
        "4",
        "--prompts",
        str(prompts),
        "--out",
        str(tmp_path / "p.png"),
        "--json",
        str(tmp_path / "p.json"),
        "--no-progress",
    ]
    r = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert r.returncode == 1  # some requests failed
    summary = json.loads((tmp_path / "p.json").read_text())
    assert summary["ok"] == 5 and summary["errors"] == {"400": 5}
    assert "400: 5" in r.stdout


def test_loadgen_refuses_remote_targets(tmp_path: Path) -> None:
    cmd = [sys.executable, "examples/loadgen.py", "--url", "http://example.com:8000"]
    r = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert r.returncode == 2 and "--allow-remote" in r.stderr


def test_ttft_slo_flag_reaches_the_batch_config() -> None:
    assert parse_settings(["serve", "--model", "fake", "--ttft-slo", "0.5"]).batch.ttft_slo_s == 0.5
    assert parse_settings(["serve", "--model", "fake"]).batch.ttft_slo_s is None
