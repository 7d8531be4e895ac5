"""The README is the front door: its embedding example runs as written, on the embedded model,
and the commands it names exist."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()


@pytest.mark.model
def test_embedding_example_runs_on_the_embedded_model(tmp_path: Path) -> None:
    section = README.split("## Embedding it", 1)[1]
    code = re.search(r"```python\n(.*?)```", section, re.S)
    assert code, "the README lost its embedding example"
    script = tmp_path / "example.py"
    script.write_text(code.group(1))
    env = {**os.environ, "OMP_WAIT_POLICY": "PASSIVE"}
    out = subprocess.run(
        [sys.executable, str(script)], capture_output=True, text=True, timeout=240, env=env, cwd=tmp_path
    )
    assert out.returncode == 0, out.stderr[-3000:]
    assert out.stdout.strip(), "the example streamed no text"


def test_the_two_commands_exist() -> None:
    assert "make demo" in README and "make test" in README
    makefile = (ROOT / "Makefile").read_text()
    for target in ("demo", "test", "setup", "serve", "bench", "bench-hf"):
        assert re.search(rf"^{re.escape(target)}:", makefile, re.M), target
    assert "make test" in (ROOT / ".ci" / "run").read_text()
