"""The README is the front door: its embedding example runs as written, on the embedded model, on
an idle machine and beside a busy neighbour; the commands it names exist."""

from __future__ import annotations

import multiprocessing
import os
import re
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()


def _spin() -> None:
    while True:
        pass


@pytest.fixture(params=[0, 2], ids=["idle", "two-busy-neighbours"])
def neighbours(request: pytest.FixtureRequest) -> Iterator[int]:
    """Processes that keep every core of this 2-core machine busy while the example runs."""
    hogs = [
        multiprocessing.get_context("spawn").Process(target=_spin, daemon=True) for _ in range(request.param)
    ]
    for h in hogs:
        h.start()
    yield request.param
    for h in hogs:
        h.terminate()
        h.join()


@pytest.mark.model
def test_embedding_example_runs_on_the_embedded_model(tmp_path: Path, neighbours: int) -> None:
    section = README.split("## Embedding it", 1)[1]
    code = re.search(r"```python\n(.*?)```", section, re.S)
    assert code, "the README lost its embedding example"
    script = tmp_path / "example.py"
    script.write_text(code.group(1))
    # The user's environment as it comes: no OpenMP setting (the library chooses its own policy).
    env = {k: v for k, v in os.environ.items() if k not in ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT")}
    out = subprocess.run(
        [sys.executable, str(script)], capture_output=True, text=True, timeout=240, env=env, cwd=tmp_path
    )
    assert out.returncode == 0, out.stderr[-3000:]
    text = out.stdout.strip()
    assert text, "the example printed nothing"
    # It prints the chat result's finish reason and token count last.
    assert re.search(r"\((stop|length), \d+ tokens\)$", text), text[-500:]
    if not neighbours:  # an idle machine streams 32 tokens well inside the 10 s deadline
        assert "[stopped:" not in text, text[-500:]


def test_the_two_commands_exist() -> None:
    assert "make demo" in README and "make test" in README
    makefile = (ROOT / "Makefile").read_text()
    for target in ("demo", "test", "test-fast", "lint", "test-latest", "lock", "setup", "serve", "bench"):
        assert re.search(rf"^{re.escape(target)}:", makefile, re.M), target
    ci = (ROOT / ".ci" / "run").read_text()
    assert "make lint" in ci and "make test" in ci
