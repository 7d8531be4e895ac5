"""Helpers for the tools' tests: run ``python -m batcher.adapters.tools ...`` as a user would."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
#: The deliberately broken backends (``--backend leaky.py:NAME``).
LEAKY = Path(__file__).with_name("leaky.py")


def run_tool(*args: str, timeout: float = 240) -> subprocess.CompletedProcess[str]:
    """The command's exit status, stdout (tables, verdicts) and stderr (progress bars)."""
    return subprocess.run(
        [sys.executable, "-m", "batcher.adapters.tools", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        cwd=ROOT,
        check=False,
    )
