"""The ``llm-batcher`` console script: ``serve``, ``bench``, ``selftest``; ``llm-batcher --version``.

A dispatcher: one subparser per command. ``serve``'s flags are the one table :data:`_FLAGS`; every
flag has an ``LLM_BATCHER_<NAME>`` environment variable (``--max-batch-size`` ↔
``LLM_BATCHER_MAX_BATCH_SIZE``); a flag beats its variable, the variable beats the default. The
core reads no environment; this script is where it happens, explicitly. Bad settings end in one
line on stderr (status 2), never a traceback.
"""

from __future__ import annotations

import argparse
import importlib.metadata
import logging
import os
import sys
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

from batcher import BatchConfig, InvalidRequest

__all__ = ["main", "parse_settings"]

ENV_PREFIX = "LLM_BATCHER_"


def _names(value: str) -> list[str]:
    return [n.strip() for n in value.split(",") if n.strip()]


# (flag, type, default, help); the destination is the flag without dashes. A list default means
# a repeatable flag (its values are added up; its variable is comma-separated).
_FLAGS: tuple[tuple[str, Callable[[str], Any], Any, str], ...] = (
    (
        "--model",
        str,
        None,
        "model folder, .gguf file or Hugging Face id; 'fake' for the fake backend; "
        "unset: the embedded SmolLM2",
    ),
    (
        "--served-model-name",
        _names,
        [],
        "the model id clients send; repeat or comma-separate: the "
        "first is canonical, the rest aliases (unset: the model's own name)",
    ),
    ("--dtype", str, None, "weights dtype for the HF backend (float32, bfloat16...; unset: auto)"),
    ("--device", str, None, "device for the HF backend (cpu, cuda, cuda:1...; unset: cpu)"),
    ("--host", str, "127.0.0.1", "address to bind"),
    ("--port", int, 8000, "port to bind"),
    (
        "--api-key-file",
        str,
        None,
        "require a key on /v1/*: one 'key [tenant] [weight]' per line, "
        "'#' comments (health, ready, metrics stay open)",
    ),
    (
        "--api-key",
        str,
        None,
        "one required key (tenant 'default'); ps shows argv: prefer LLM_BATCHER_API_KEY or --api-key-file",
    ),
    ("--max-batch-size", int, None, "sequences per step (unset: 32)"),
    ("--max-queue", int, None, "waiting requests before 429 (unset: 256)"),
    ("--batch-window", float, None, "seconds an idle engine waits to fill a first batch (unset: 0.002)"),
    (
        "--max-batch-tokens",
        int,
        None,
        "KV budget: prompt + max_tokens summed over the batch (unset: the backend's)",
    ),
    ("--default-max-tokens", int, None, "max_tokens when a request gives none (unset: 256)"),
    ("--max-tokens-limit", int, None, "largest max_tokens accepted (unset: 32768)"),
    ("--drain-timeout", float, None, "seconds SIGTERM waits for running requests (unset: 30)"),
    ("--default-deadline", float, None, "seconds each request may take (unset: no deadline)"),
    (
        "--ttft-slo",
        float,
        None,
        "seconds: refuse at once (429) a request whose predicted time to first token exceeds it",
    ),
    (
        "--max-prompt-chars",
        int,
        None,
        "longer prompts get 400 before tokenizing (unset: derived from the model's context and vocabulary)",
    ),
    ("--max-body-bytes", int, None, "larger request bodies get 413 (unset: 2 x max prompt chars + 64 KiB)"),
    ("--header-timeout", float, 10.0, "seconds a connection has to send a complete request head"),
    ("--body-timeout", float, 30.0, "seconds a request has to send its whole body"),
    ("--keep-alive", float, 5.0, "seconds an idle keep-alive connection stays open"),
    (
        "--max-connections",
        int,
        1024,
        "open connections at most (lowered to fit ulimit -n); at the cap the oldest idle one is closed",
    ),
    ("--docs", bool, False, "serve /docs, /redoc and /openapi.json (behind the key when there is one)"),
    (
        "--allow-special-tokens",
        bool,
        False,
        "parse special-token text (<|im_start|>...) in prompts and messages as control tokens "
        "(trusted callers only: it lets user text forge chat turns)",
    ),
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
    "ttft_slo": "ttft_slo_s",
}
_TRUE = {"1", "true", "yes", "on"}


class _DefaultsFormatter(argparse.HelpFormatter):
    """``--help`` shows each flag's default, where it has one (unset ones say what happens)."""

    def _get_help_string(self, action: argparse.Action) -> str | None:
        text = action.help or ""
        if action.default in (None, False, [], argparse.SUPPRESS):
            return text
        return f"{text} (default: {action.default})"


class _Repeatable(argparse.Action):
    """A repeatable, comma-separable flag whose first use replaces its default (the variable)."""

    def __call__(self, parser: Any, namespace: Any, values: Any, option_string: Any = None) -> None:
        current = getattr(namespace, self.dest)
        setattr(namespace, self.dest, [*([] if current is self.default else current), *values])


def _version() -> str:
    try:
        return importlib.metadata.version("llm-batcher")
    except importlib.metadata.PackageNotFoundError:
        from batcher import __version__

        return __version__


def _parser(env: Mapping[str, str]) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="llm-batcher",
        description="Serve the OpenAI-compatible API; measure batching (bench); check it (selftest).",
        epilog=f"Every flag can also be set as an environment variable, e.g. {ENV_PREFIX}PORT=9000.",
    )
    parser.add_argument("--version", action="version", version=f"llm-batcher {_version()}")
    sub = parser.add_subparsers(dest="command", required=True)
    serve = sub.add_parser(
        "serve",
        help="serve the OpenAI-compatible HTTP API",
        formatter_class=_DefaultsFormatter,
    )
    for flag, kind, default, text in _FLAGS:
        var = ENV_PREFIX + flag[2:].upper().replace("-", "_")
        value = env.get(var)
        if kind is bool:
            on = default if value is None else value.strip().lower() in _TRUE
            serve.add_argument(flag, action="store_true", default=on, help=f"{text} [env {var}]")
            continue
        if value is not None:
            try:
                default = kind(value)
            except ValueError:
                parser.error(f"{var}={value!r} is not a valid {getattr(kind, '__name__', 'value')}")
        action: Any = _Repeatable if isinstance(default, list) else "store"
        serve.add_argument(flag, type=kind, default=default, action=action, help=f"{text} [env {var}]")
    from .ray import add_arguments  # --replicas, --ray-address... (Ray itself loads on use)
    from .tools import add_subcommands  # bench, selftest (their heavy imports load on use)

    add_arguments(serve)
    add_subcommands(sub)
    return parser


def parse_settings(argv: Sequence[str] | None = None, env: Mapping[str, str] | None = None) -> Any:
    """``serve``'s flags and environment → :class:`~batcher.adapters.server._app.ServerSettings`."""
    env = os.environ if env is None else env
    parser = _parser(env)
    return _settings(parser, parser.parse_args(argv), env)


def _settings(parser: argparse.ArgumentParser, args: argparse.Namespace, env: Mapping[str, str]) -> Any:
    from .server._app import ServerSettings
    from .server._protocol import ConnectionLimits

    batch = {
        field: getattr(args, dest) for dest, field in _BATCH_FIELDS.items() if getattr(args, dest) is not None
    }
    try:
        _check_model(args.model)
        keys = _api_keys(args, env)
        config = BatchConfig(**batch)
        limits = ConnectionLimits(
            header_timeout_s=args.header_timeout,
            body_timeout_s=args.body_timeout,
            keep_alive_s=args.keep_alive,
            max_connections=args.max_connections,
        )
    except InvalidRequest as e:
        parser.error(str(e))
    for name in ("max_prompt_chars", "max_body_bytes"):
        if getattr(args, name) is not None and getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    return ServerSettings(
        model=args.model,
        served_model_names=tuple(dict.fromkeys(args.served_model_name)),
        dtype=args.dtype,
        device=args.device,
        host=args.host,
        port=args.port,
        api_keys=tuple(keys),
        batch=config,
        default_deadline_s=args.default_deadline,
        max_prompt_chars=args.max_prompt_chars,
        max_body_bytes=args.max_body_bytes,
        limits=limits,
        docs=args.docs,
        allow_special_tokens=args.allow_special_tokens,
        fake_step_s=args.fake_step,
        fake_step_per_seq_s=args.fake_step_per_seq,
        log_level=args.log_level,
    )


def _check_model(model: str | None) -> None:
    """A model that names a local path must exist: say so in one line (not, later, a traceback
    about hub repository ids)."""
    if model is None or model == "fake" or Path(model).expanduser().exists():
        return
    if model.startswith((".", "/", "~")) or model.endswith(".gguf"):
        raise InvalidRequest(
            f"no such {'file' if model.endswith('.gguf') else 'folder'}: {model}", field="model"
        )
    if model.count("/") != 1:
        raise InvalidRequest(
            f"no such folder: {model} (and not a Hugging Face id, which looks like org/name)", field="model"
        )


def _api_keys(args: argparse.Namespace, env: Mapping[str, str]) -> list[Any]:
    """The keys from ``--api-key`` / ``LLM_BATCHER_API_KEY`` and ``--api-key-file``."""
    from .server._auth import ApiKey, parse_key_file

    keys = parse_key_file(args.api_key_file) if args.api_key_file is not None else []
    if args.api_key is not None:
        if not args.api_key.strip():
            source = "LLM_BATCHER_API_KEY" if env.get(ENV_PREFIX + "API_KEY") == args.api_key else "--api-key"
            raise InvalidRequest(
                f"{source} is empty: an empty key would let everyone in. Set a key, or unset it "
                "to serve without auth",
                field="api_key",
            )
        keys.append(ApiKey(args.api_key))
    return keys


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``llm-batcher``."""
    parser = _parser(os.environ)
    args = parser.parse_args(argv)
    if args.command != "serve":
        from .tools import run

        return run(args)
    settings = _settings(parser, args, os.environ)
    logging.basicConfig(
        level=settings.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    from .ray import maybe_run

    status = maybe_run(args, settings)  # --replicas / --ray-address: the same API on Ray Serve
    if status is not None:
        return status
    from .server._app import serve

    return serve(settings)


if __name__ == "__main__":
    sys.exit(main())
