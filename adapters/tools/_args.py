"""The flags of ``bench`` and ``selftest`` (their help shows every default)."""

from __future__ import annotations

import argparse
from typing import Any

__all__ = ["add_subcommands"]


class _Help(argparse.ArgumentDefaultsHelpFormatter):
    """Appends "(default: X)" to every flag's help, unless the help already says its default."""

    def _get_help_string(self, action: argparse.Action) -> str | None:
        text = action.help or ""
        return text if "default" in text else super()._get_help_string(action)


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be an integer >= 1, got {value}")
    return value


def _positive_float(text: str) -> float:
    value = float(text)
    if not value > 0:
        raise argparse.ArgumentTypeError(f"must be a number > 0, got {text}")
    return value


def _non_negative_float(text: str) -> float:
    value = float(text)
    if not value >= 0:
        raise argparse.ArgumentTypeError(f"must be a number >= 0, got {text}")
    return value


def _model_flags(p: argparse.ArgumentParser, *, max_tokens: int) -> None:
    p.add_argument(
        "--model",
        default=None,
        help="model folder, Hugging Face id or .gguf file; 'fake' for the fake backend "
        "(default: the embedded SmolLM2-135M-Instruct)",
    )
    p.add_argument("--device", default="cpu", help="device for the HF backend (cpu, cuda, cuda:1...)")
    p.add_argument(
        "--dtype",
        default="auto",
        help="weights dtype: auto (float32 on CPU, bf16 on CUDA), float32, bfloat16...",
    )
    p.add_argument(
        "--backend",
        default=None,
        metavar="MODULE:NAME",
        help="your own backend: MODULE:NAME or FILE.py:NAME, called as NAME(model, dtype=, device=) "
        "(default: the HF backend, or the fake one for --model fake)",
    )
    p.add_argument(
        "--prompts", default=None, metavar="FILE", help="one prompt per line (default: a built-in set)"
    )
    p.add_argument(
        "--completion",
        action="store_true",
        help="send each prompt as completion text instead of a one-message chat",
    )
    p.add_argument(
        "--max-tokens", type=_positive_int, default=max_tokens, metavar="N", help="tokens per request"
    )
    p.add_argument(
        "--fake-step",
        type=_non_negative_float,
        default=0.02,
        metavar="SECONDS",
        help="fake backend: seconds per step (a)",
    )
    p.add_argument(
        "--fake-step-per-seq",
        type=_non_negative_float,
        default=0.001,
        metavar="SECONDS",
        help="fake backend: extra seconds per sequence per step (b): a step of B costs a + b*B",
    )


def _bench_flags(p: argparse.ArgumentParser) -> None:
    _model_flags(p, max_tokens=64)
    p.add_argument(
        "--max-batch-size",
        type=_positive_int,
        default=32,
        metavar="N",
        help="the sweep's largest concurrency N (N = 1, 2, 4 ... this)",
    )
    amount = p.add_mutually_exclusive_group()
    amount.add_argument(
        "--requests-per-level",
        type=_positive_int,
        default=None,
        metavar="R",
        help="requests at each level, at least the largest N (default: max(8, 3N) at level N)",
    )
    amount.add_argument(
        "--duration",
        type=_positive_float,
        default=None,
        metavar="SECONDS",
        help="seconds per level instead of a request count (streams still open then are cancelled; "
        "default: count requests)",
    )
    p.add_argument(
        "--out", default="bench-results", metavar="DIR", help="folder for bench_speedup.json and .png"
    )
    p.add_argument(
        "--slo-ttft",
        type=_positive_float,
        default=None,
        metavar="SECONDS",
        help="time-to-first-token objective: recommend the largest max_batch_size meeting it (default: none)",
    )
    p.add_argument(
        "--slo-itl",
        type=_positive_float,
        default=None,
        metavar="SECONDS",
        help="inter-token latency objective, as --slo-ttft (default: none)",
    )
    p.add_argument(
        "--slo-percentile", type=int, choices=(50, 90, 99), default=90, help="the percentile SLOs apply to"
    )


def _selftest_flags(p: argparse.ArgumentParser) -> None:
    _model_flags(p, max_tokens=32)
    p.add_argument(
        "--near-tie",
        type=_non_negative_float,
        default=None,
        metavar="MARGIN",
        help="a divergence whose logit margin is below this is a near-tie, not a bug "
        "(default: 0.01 for float32 weights, 0.5 for 16-bit ones)",
    )


def add_subcommands(subparsers: Any) -> None:
    """Add ``bench`` and ``selftest`` to an ``add_subparsers(dest="command")`` object."""
    bench = subparsers.add_parser(
        "bench",
        help="measure the speedup of batching on your model and hardware",
        description="Sweep the concurrency N over 1, 2, 4 ... --max-batch-size (N closed-loop "
        "clients) through a real Batcher: tokens/s, TTFT and inter-token latency; fit Amdahl's and "
        "Gustafson's laws; write bench_speedup.json and bench_speedup.png to --out.",
        formatter_class=_Help,
    )
    _bench_flags(bench)
    selftest = subparsers.add_parser(
        "selftest",
        help="check that batching does not change greedy outputs",
        description="Run each prompt alone (greedy), then all together under staggered load with "
        "cancelled extra copies; report each prompt as equal or diverged, with the first differing "
        "token and the logit margin there. Exit 1 on a divergence that is not a near-tie.",
        formatter_class=_Help,
    )
    _selftest_flags(selftest)
