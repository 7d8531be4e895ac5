"""The hooks ``llm-batcher`` wires in (``add_subcommands``, ``run``) and ``python -m`` entry."""

from __future__ import annotations

import argparse
import subprocess
import sys
from pathlib import Path

import pytest
from batcher.adapters.tools import add_subcommands, run
from batcher.adapters.tools.__main__ import main

from .conftest import ROOT, run_tool


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="llm-batcher")
    add_subcommands(parser.add_subparsers(dest="command", required=True))
    return parser


def test_subcommands_parse_with_their_defaults() -> None:
    bench = _parser().parse_args(["bench"])
    assert (bench.command, bench.model, bench.device, bench.dtype) == ("bench", None, "cpu", "auto")
    assert (bench.max_batch_size, bench.max_tokens, bench.requests_per_level, bench.duration) == (
        32,
        64,
        None,
        None,
    )
    assert (bench.slo_ttft, bench.slo_itl, bench.slo_percentile, bench.out) == (
        None,
        None,
        90,
        "bench-results",
    )
    selftest = _parser().parse_args(["selftest", "--model", "fake", "--near-tie", "0.2"])
    assert (selftest.command, selftest.model, selftest.max_tokens, selftest.near_tie) == (
        "selftest",
        "fake",
        32,
        0.2,
    )


def test_help_shows_every_default(capsys: pytest.CaptureFixture[str]) -> None:
    for command in ("bench", "selftest"):
        with pytest.raises(SystemExit) as e:
            _parser().parse_args([command, "--help"])
        assert e.value.code == 0
        text = " ".join(capsys.readouterr().out.split())
        for flag in ("--model", "--device", "--dtype", "--prompts", "--max-tokens", "--backend"):
            assert flag in text
        assert "(default: the embedded SmolLM2-135M-Instruct)" in text and "(default: cpu)" in text
    assert "(default: 32)" in text and "(default: 0.01 for float32" in text  # selftest's


@pytest.mark.parametrize(
    "argv",
    [
        ["bench", "--max-batch-size", "0"],
        ["bench", "--requests-per-level", "8", "--duration", "3"],
        ["bench", "--slo-percentile", "75"],
        ["selftest", "--near-tie", "-1"],
    ],
)
def test_bad_flags_exit_2(argv: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as e:
        _parser().parse_args(argv)
    assert e.value.code == 2
    assert "error:" in capsys.readouterr().err


def test_bad_backend_or_prompts_exit_2_with_a_message(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    empty = tmp_path / "empty.txt"
    empty.write_text("\n  \n")
    cases = {
        ("--backend", "no_colon"): "--backend must be MODULE:NAME or FILE.py:NAME",
        ("--backend", f"{tmp_path}/missing.py:Backend"): "no Python file at",
        ("--backend", "json:NoSuchThing"): "json has no callable 'NoSuchThing'",
        ("--prompts", str(empty)): "holds no prompt: write one per line",
        ("--prompts", str(tmp_path / "absent.txt")): "cannot read --prompts",
    }
    for flags, message in cases.items():
        assert main(["selftest", "--model", "fake", *flags]) == 2
        assert message in capsys.readouterr().err


def test_run_refuses_an_unknown_command() -> None:
    with pytest.raises(ValueError, match="unknown command 'serve'"):
        run(argparse.Namespace(command="serve"))


def test_python_dash_m_entry_point() -> None:
    done = run_tool("--help")
    assert done.returncode == 0
    assert "bench" in done.stdout and "selftest" in done.stdout


def test_importing_the_tools_loads_nothing_heavy() -> None:
    code = (
        "import sys, batcher.adapters.tools; "
        "print(sorted(m for m in ('torch', 'transformers', 'matplotlib', 'tqdm') if m in sys.modules))"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, check=True)
    assert done.stdout.strip() == "[]"


def test_a_refused_request_or_an_empty_window_ends_bench_with_a_message() -> None:
    too_long = run_tool("bench", "--model", "fake", "--max-batch-size", "1", "--max-tokens", "5000")
    assert too_long.returncode == 2
    assert "exceeds the context window of 4096 tokens" in too_long.stderr
    no_token = run_tool("bench", "--model", "fake", "--max-batch-size", "1", "--duration", "0.001")
    assert no_token.returncode == 2
    assert "N=1 delivered no token within its window (0.001 s): give a longer --duration" in no_token.stderr


@pytest.mark.parametrize("command", ["bench", "selftest"])
def test_the_console_script_dispatches_to_the_tools(command: str, capsys: pytest.CaptureFixture[str]) -> None:
    from batcher.adapters._cli import main

    with pytest.raises(SystemExit) as exc:
        main([command, "--help"])
    assert exc.value.code == 0
    assert f"llm-batcher {command}" in capsys.readouterr().out
