"""Suite-wide settings. Each folder mirrors a part of the tree: core/, adapters/, server/, monitoring/.

Tiers: ``make test`` runs everything (CI); ``make test-fast`` deselects the markers ``model`` (loads
the real SmolLM2 weights), ``prometheus`` (needs Debian's prometheus/promtool) and ``slow``.
"""

from __future__ import annotations

import pytest


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        if "promtool" in getattr(item, "fixturenames", ()):
            item.add_marker(pytest.mark.prometheus)
