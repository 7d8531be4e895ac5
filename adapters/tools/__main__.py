"""``python -m batcher.adapters.tools bench|selftest [flags]``."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from . import add_subcommands, run


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m batcher.adapters.tools",
        description="Measure llm-batcher's batching speedup (bench), check that batching leaves "
        "greedy outputs unchanged (selftest).",
    )
    add_subcommands(parser.add_subparsers(dest="command", required=True))
    return run(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
