"""Fixtures of the monitoring tests (helpers live in ``_harness``)."""

from __future__ import annotations

import pytest

from ._harness import require_tool


@pytest.fixture(scope="session")
def promtool() -> str:
    """promtool's path; fails (never skips) with the setup command when it is missing."""
    return require_tool("promtool")
