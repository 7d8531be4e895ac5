"""The ``llm-batcher`` console script: ``llm-batcher serve [flags]``.

Every flag has an ``LLM_BATCHER_<NAME>`` environment variable (``--max-batch-size`` ↔
``LLM_BATCHER_MAX_BATCH_SIZE``); a flag beats its variable, the variable beats the default. The
core reads no environment; this script is where it happens, explicitly.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from batcher import BatchConfig, InvalidRequest

__all__ = ["main", "parse_settings"]

ENV_PREFIX = "LLM_BATCHER_"

# (flag, type, default, help); the destination is the flag without dashes.
_FLAGS: tuple[tuple[str, Callable[[str], Any], Any, str], ...] = (
    (
        "--model",
        str,
        None,
        "model path or Hugging Face id; 'fake' for the fake backend; default: the embedded SmolLM2",
    ),
    ("--dtype", str, None, "weights dtype for the HF backend (float32, bfloat16...)"),
    ("--device", str, None, "device for the HF backend (cpu, cuda, cuda:1...)"),
    ("--host", str, "127.0.0.1", "address to bind"),
    ("--port", int, 8000, "port to bind"),
    (
        "--api-key",
        str,
        None,
        "require 'Authorization: Bearer KEY' on /v1/* (health, ready, metrics stay open)",
    ),
    ("--max-batch-size", int, None, "sequences per step"),
    ("--max-queue", int, None, "waiting requests before 429"),
    ("--batch-window", float, None, "seconds an idle engine waits to fill a first batch"),
    ("--max-batch-tokens", int, None, "KV budget: prompt + max_tokens summed over the batch"),
    ("--default-max-tokens", int, None, "max_tokens when a request gives none"),
    ("--max-tokens-limit", int, None, "largest max_tokens accepted"),
    ("--drain-timeout", float, None, "seconds SIGTERM waits for running requests"),
    ("--default-deadline", float, None, "seconds each request may take (default: none)"),
    ("--max-body-bytes", int, 1 << 20, "larger request bodies get 413"),
    ("--fake-step", float, 0.02, "fake backend: seconds per step"),
    ("--fake-step-per-seq", float, 0.001, "fake backend: extra seconds per sequence per step"),
    ("--log-level", str, "info", "uvicorn and server log level"),
)

# Flags that fill BatchConfig, by field name.
_BATCH_FIELDS = {
    "max_batch_size": "max_batch_size",
    "max_queue": "max_queue",
    "batch_window": "batch_window_s",
    "max_batch_tokens": "max_batch_tokens",
    "default_max_tokens": "default_max_tokens",
    "max_tokens_limit": "max_tokens_limit",
    "drain_timeout": "drain_timeout_s",
}


def _parser(env: Mapping[str, str]) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="llm-batcher",
        description="An OpenAI-compatible server over llm-batcher's continuous batching.",
        epilog=f"Every flag can also be set as an environment variable, e.g. {ENV_PREFIX}PORT=9000.",
    )
    sub = parser.add_subparsers(dest="command", required=True)
    serve = sub.add_parser("serve", help="serve the OpenAI-compatible HTTP API")
    for flag, kind, default, text in _FLAGS:
        var = ENV_PREFIX + flag[2:].upper().replace("-", "_")
        value = env.get(var)
        if value is not None:
            try:
                default = kind(value)
            except ValueError:
                parser.error(f"{var}={value!r} is not a valid {kind.__name__}")
        serve.add_argument(flag, type=kind, default=default, help=f"{text} [env {var}]")
    return parser


def parse_settings(argv: Sequence[str] | None = None, env: Mapping[str, str] | None = None) -> Any:
    """Flags and environment → :class:`~batcher.adapters.server._app.ServerSettings`."""
    from .server._app import ServerSettings

    parser = _parser(os.environ if env is None else env)
    args = parser.parse_args(argv)
    batch = {
        field: getattr(args, dest) for dest, field in _BATCH_FIELDS.items() if getattr(args, dest) is not None
    }
    try:
        config = BatchConfig(**batch)
    except InvalidRequest as e:
        parser.error(str(e))
    return ServerSettings(
        model=args.model,
        dtype=args.dtype,
        device=args.device,
        host=args.host,
        port=args.port,
        api_key=args.api_key or None,
        batch=config,
        default_deadline_s=args.default_deadline,
        max_body_bytes=args.max_body_bytes,
        fake_step_s=args.fake_step,
        fake_step_per_seq_s=args.fake_step_per_seq,
        log_level=args.log_level,
    )


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``llm-batcher``."""
    settings = parse_settings(argv)
    logging.basicConfig(
        level=settings.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    from .server._app import serve

    return serve(settings)


if __name__ == "__main__":
    sys.exit(main())
