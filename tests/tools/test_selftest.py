"""``selftest``: it passes where batching changes nothing and fails, naming the prompt, where a
backend leaks one row's tokens into another. Run as a user runs it, through the command."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from batcher.adapters.tools._compare import Divergence, first_divergence, status
from batcher.adapters.tools._setup import SELFTEST_PROMPTS

from .conftest import LEAKY, run_tool


def test_first_divergence() -> None:
    assert first_divergence([1, 2, 3], [1, 2, 3]) is None
    assert first_divergence([1, 2, 3], [1, 5, 3]) == Divergence(1, 2, 5)
    assert first_divergence([1, 2, 3], [1, 2]) == Divergence(2, 3, None)  # ended early
    assert first_divergence([1, 2], [1, 2, 3]) == Divergence(2, None, 3)
    assert first_divergence([1, 2, 3], [1, 2], prefix=True) is None  # a cancelled run
    assert first_divergence([1, 2, 3], [], prefix=True) is None
    assert first_divergence([1, 2, 3], [1, 4], prefix=True) == Divergence(1, 2, 4)
    assert first_divergence([1, 2], [1, 2, 3], prefix=True) == Divergence(2, None, 3)


def test_status_tells_a_near_tie_from_a_bug() -> None:
    d = Divergence(3, 10, 11)
    assert status(None, None, 0.5) == "equal"
    assert status(d, 0.2, 0.5) == "near-tie"
    assert status(d, -0.2, 0.5) == "near-tie"  # the solo pass itself preferred the other token
    assert status(d, 0.7, 0.5) == "DIVERGED"
    assert status(d, None, 0.5) == "DIVERGED"  # no logits to tell: a bug until shown otherwise


def _rows(stdout: str) -> dict[str, str]:
    """The verdict of each run of the table, by its label (``#3``, ``#4 copy``)."""
    rows = {}
    for line in stdout.splitlines():
        m = re.match(r"(#\d+(?: copy)?)[^|]*?\s(equal|near-tie|DIVERGED|failed)\b", line)
        if m:
            rows[m.group(1)] = m.group(2)
    return rows


FAST = ("--model", "fake", "--fake-step", "0.001", "--fake-step-per-seq", "0", "--max-tokens", "8")


def test_selftest_passes_on_the_fake_backend() -> None:
    done = run_tool("selftest", *FAST)
    assert done.returncode == 0, done.stdout + done.stderr
    rows = _rows(done.stdout)
    n = len(SELFTEST_PROMPTS)
    assert [rows[f"#{i}"] for i in range(n)] == ["equal"] * n
    copies = [label for label in rows if label.endswith("copy")]
    assert len(copies) == len(range(1, n, 3)) and {rows[c] for c in copies} == {"equal"}
    assert f"{n + len(copies)} equal, 0 near-tie, 0 DIVERGED, 0 failed" in done.stdout
    assert done.stdout.rstrip().endswith("PASS")


def test_selftest_fails_on_a_backend_that_leaks_tokens_between_rows() -> None:
    done = run_tool("selftest", *FAST, "--backend", f"{LEAKY}:LeakyFake")
    assert done.returncode == 1, done.stdout + done.stderr
    rows = _rows(done.stdout)
    diverged = [label for label, verdict in rows.items() if verdict == "DIVERGED"]
    assert len(diverged) >= 2  # a swap hurts both rows
    first = int(diverged[0].lstrip("#").split()[0])
    assert f"DIVERGED: {diverged[0]}" in done.stdout
    assert SELFTEST_PROMPTS[first][:39] in done.stdout.split("\nDIVERGED: ", 1)[1]
    assert "no model to ask" in done.stdout
    assert done.stdout.rstrip().endswith("FAIL")


def test_selftest_reads_prompts_from_a_file(tmp_path: Path) -> None:
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("alpha beta\n\n  gamma delta  \nepsilon\n")
    done = run_tool("selftest", *FAST, "--prompts", str(prompts), "--completion")
    assert done.returncode == 0, done.stdout + done.stderr
    assert set(_rows(done.stdout)) == {"#0", "#1", "#2", "#1 copy"}
    assert "gamma delta" in done.stdout


@pytest.mark.model
@pytest.mark.slow
def test_selftest_passes_on_the_embedded_model_in_float32() -> None:
    done = run_tool("selftest", "--dtype", "float32", timeout=600)
    assert done.returncode == 0, done.stdout + done.stderr
    rows = _rows(done.stdout)
    assert [rows[f"#{i}"] for i in range(len(SELFTEST_PROMPTS))] == ["equal"] * len(SELFTEST_PROMPTS)
    assert "0 DIVERGED, 0 failed" in done.stdout and done.stdout.rstrip().endswith("PASS")


@pytest.mark.model
@pytest.mark.slow
def test_selftest_fails_on_an_hf_backend_that_leaks_tokens_between_rows(tmp_path: Path) -> None:
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("\n".join(SELFTEST_PROMPTS[:6]) + "\n")
    done = run_tool(
        "selftest",
        *("--dtype", "float32", "--max-tokens", "16", "--prompts", str(prompts)),
        *("--backend", f"{LEAKY}:leaky_hf"),
        timeout=600,
    )
    assert done.returncode == 1, done.stdout + done.stderr
    bugs = re.findall(r"^(#\d+)\s.*\sDIVERGED\s+(\d+)\s.*\s(-?\d+\.\d+)$", done.stdout, re.M)
    assert bugs, done.stdout
    for _label, _index, margin in bugs:
        assert abs(float(margin)) >= 0.01  # the default near-tie threshold for float32
    label = bugs[0][0]
    assert f"DIVERGED: {label}: " in done.stdout
    assert SELFTEST_PROMPTS[int(label[1:])][:39] in done.stdout.split("\nDIVERGED: ", 1)[1]
    assert done.stdout.rstrip().endswith("FAIL")
