"""The CLI's flags and environment, and the load generator against a fake server."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from batcher.adapters._cli import parse_settings

from .conftest import ROOT, Server


def test_flags_environment_and_defaults() -> None:
    s = parse_settings(["serve"], env={})
    assert (s.host, s.port, s.model, s.api_key) == ("127.0.0.1", 8000, None, None)
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
    assert (s.port, s.model, s.api_key, s.default_deadline_s) == (9001, "fake", "k", 2.5)
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
