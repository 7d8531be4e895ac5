"""``llm-batcher bench`` and ``llm-batcher selftest``: measure batching, and check it changes nothing.

Layout (torch, tqdm and matplotlib load on use, never on import):
    _args       the two subcommands' flags (``add_subcommands``)
    _setup      built-in prompts, ``--prompts FILE``, building the backend (HF, fake or ``--backend``)
    _bench      the concurrency sweep through a real Batcher, the table, the JSON
    _analysis   percentiles, Amdahl's and Gustafson's laws and their least-squares fits, SLO advice
    _plot       the PNG (matplotlib, Agg)
    _selftest   solo runs against a staggered crowd with cancellations, the verdict table
    _compare    where two token sequences part; near-tie or bug

``llm-batcher`` wires these in through :func:`add_subcommands` and :func:`run`; until then,
``python -m batcher.adapters.tools bench|selftest ...`` runs them. Documentation:
``docs/bench-and-selftest.md``.
"""

from __future__ import annotations

import argparse
import sys

from batcher import BatcherError, InvalidRequest

from ._args import add_subcommands

__all__ = ["add_subcommands", "run"]


def run(args: argparse.Namespace) -> int:
    """Run the subcommand ``args.command`` (``bench`` or ``selftest``); returns the exit status."""
    try:
        if args.command == "bench":
            from ._bench import run_bench

            return run_bench(args)
        if args.command == "selftest":
            from ._selftest import run_selftest

            return run_selftest(args)
    except InvalidRequest as e:  # a bad flag value, prompt file or backend spec
        print(f"llm-batcher {args.command}: {e}", file=sys.stderr)
        return 2
    except BatcherError as e:  # the backend failed or refused a request on the way
        print(f"llm-batcher {args.command} failed: {type(e).__name__}: {e}", file=sys.stderr)
        return 1
    raise ValueError(f"unknown command {args.command!r}: expected 'bench' or 'selftest'")
