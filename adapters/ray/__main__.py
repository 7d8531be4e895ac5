"""``python -m batcher.adapters.ray --replicas 2 [any llm-batcher serve flag]``.

The same as ``llm-batcher serve --replicas 2 ...`` once the console script has the hook; the serve
flags are parsed by the console script's own parser, the Ray flags by :func:`add_arguments`.
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence

from .. import _cli
from ._cli import add_arguments, maybe_run


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m batcher.adapters.ray",
        description="llm-batcher serve on Ray Serve: every `llm-batcher serve` flag, plus these.",
    )
    add_arguments(parser)
    args, rest = parser.parse_known_args(argv)
    if args.replicas is None and args.ray_address is None:
        args.replicas = 1
    settings = _cli.parse_settings(["serve", *rest])
    logging.basicConfig(
        level=settings.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    status = maybe_run(args, settings)
    assert status is not None
    return status


if __name__ == "__main__":
    sys.exit(main())
