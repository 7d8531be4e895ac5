"""The HF backend chooses a bounded OpenMP spin before torch loads, and leaves a user's choice alone."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

PROBE = (
    "import os, sys; import batcher.adapters.hf as hf; "
    "print(os.environ.get('GOMP_SPINCOUNT'), os.environ.get('OMP_WAIT_POLICY'))"
)


def _probe(extra: dict[str, str], before: str = "") -> str:
    env = {k: v for k, v in os.environ.items() if k not in ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT")}
    done = subprocess.run(
        [sys.executable, "-c", before + PROBE],
        env={**env, **extra},
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    return done.stdout.strip().splitlines()[-1]


@pytest.mark.parametrize(
    ("extra", "before", "expected"),
    [
        ({}, "", "10000 None"),  # nothing chosen: the bounded spin
        ({"OMP_WAIT_POLICY": "PASSIVE"}, "", "None PASSIVE"),  # the user's policy wins
        ({"GOMP_SPINCOUNT": "5"}, "", "5 None"),
        ({}, "import torch; ", "None None"),  # too late once torch is loaded: left alone
    ],
)
def test_wait_policy_is_set_before_torch_loads(extra: dict[str, str], before: str, expected: str) -> None:
    assert _probe(extra, before) == expected
