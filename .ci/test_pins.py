"""Print the locked pins (constraints.txt) of the [test] extra's packages, one per line: test-oldest
resolves the runtime ranges to their lowest versions but runs the tests with the tools we lock."""

from __future__ import annotations

import re
import tomllib
from pathlib import Path

root = Path(__file__).resolve().parents[1]
extra = tomllib.loads((root / "pyproject.toml").read_text())["project"]["optional-dependencies"]["test"]
names = {re.split(r"[<>=!~\[; ]", req, maxsplit=1)[0].lower().replace("_", "-") for req in extra}
for line in (root / "constraints.txt").read_text().splitlines():
    name = line.split("==", 1)[0].lower().replace("_", "-")
    if name in names:
        print(line)
