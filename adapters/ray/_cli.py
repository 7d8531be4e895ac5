"""The CLI hook: ``llm-batcher serve --replicas N`` (and ``python -m batcher.adapters.ray``).

``add_arguments(serve_parser)`` adds the Ray flags to the ``serve`` sub-command;
``maybe_run(args, settings)`` runs the Ray path when ``--replicas`` or ``--ray-address`` was
given and returns the exit status, else returns ``None`` (the single-process server runs).

Without ``--ray-address`` a local Ray starts for the life of the command, bound to 127.0.0.1 with
no dashboard, ``--ray-cpus`` CPUs, and Serve's HTTP proxy on ``--host``/``--port``. With it, the
command joins that cluster, deploys the application and, on SIGTERM/SIGINT, deletes it again
(the replicas drain) and leaves the cluster running.
"""

from __future__ import annotations

import argparse
import importlib.util
import logging
import os
import signal
import threading
from typing import Any

from batcher import InvalidRequest

from ._settings import RaySettings

__all__ = ["add_arguments", "maybe_run", "ray_settings"]

log = logging.getLogger("llm_batcher.ray")
ENV_PREFIX = "LLM_BATCHER_"

# (flag, type, help); every default is RaySettings' (None: unset).
_FLAGS: tuple[tuple[str, type, str], ...] = (
    (
        "--replicas",
        int,
        "serve through Ray Serve with N replicas (N batchers); the initial count when autoscaling",
    ),
    (
        "--ray-address",
        str,
        "join this Ray cluster (auto, host:port, ray://...) instead of starting a local one",
    ),
    ("--devices", int, "devices per replica, one engine each: GPUs per replica with --device cuda"),
    ("--min-replicas", int, "autoscaling: fewest replicas"),
    ("--max-replicas", int, "autoscaling on the batchers' queue depth, up to this many replicas"),
    ("--target-work", float, "autoscaling: queued + running requests per replica (default: a full batch)"),
    ("--upscale-delay", float, "autoscaling: seconds of high load before adding a replica"),
    ("--downscale-delay", float, "autoscaling: seconds of low load before removing one (it drains first)"),
    ("--cpus-per-replica", float, "CPUs Ray reserves for each replica"),
    ("--ray-cpus", int, "local Ray only: CPUs it may use (default: the machine's)"),
)
_FIELDS = {
    "replicas": "replicas",
    "ray_address": "ray_address",
    "devices": "devices",
    "min_replicas": "min_replicas",
    "max_replicas": "max_replicas",
    "target_work": "target_work",
    "upscale_delay": "upscale_delay_s",
    "downscale_delay": "downscale_delay_s",
    "cpus_per_replica": "cpus_per_replica",
}


def add_arguments(serve_parser: argparse.ArgumentParser) -> None:
    """Add the Ray flags (each also ``LLM_BATCHER_<NAME>``) to the ``serve`` parser. Imports no Ray."""
    group = serve_parser.add_argument_group("replicas on Ray Serve (the [ray] extra)")
    for flag, kind, text in _FLAGS:
        var = ENV_PREFIX + flag[2:].upper().replace("-", "_")
        raw = os.environ.get(var)
        try:
            default = kind(raw) if raw is not None else None
        except ValueError:
            serve_parser.error(f"{var}={raw!r} is not a valid {kind.__name__}")
        group.add_argument(flag, type=kind, default=default, help=f"{text} [env {var}]")


def ray_settings(args: argparse.Namespace) -> RaySettings | None:
    """The Ray settings the flags ask for, or ``None`` when neither --replicas nor --ray-address is set."""
    if args.replicas is None and args.ray_address is None:
        return None
    given = {field: getattr(args, dest) for dest, field in _FIELDS.items() if getattr(args, dest) is not None}
    return RaySettings(**given)


def maybe_run(args: argparse.Namespace, settings: Any) -> int | None:
    """Run ``serve`` on Ray Serve if the flags ask for it (returns the exit status), else ``None``."""
    try:
        chosen = ray_settings(args)
    except InvalidRequest as e:
        log.error("%s", e)
        return 2
    if chosen is None:
        return None
    if importlib.util.find_spec("ray") is None:
        raise ModuleNotFoundError(
            "--replicas needs 'ray': install it with `pip install 'llm-batcher[ray]'`", name="ray"
        )
    return run(settings, chosen, num_cpus=args.ray_cpus)


def run(settings: Any, ray_settings: RaySettings, *, num_cpus: int | None = None) -> int:
    """Start (or join) Ray, deploy the application, serve until SIGTERM/SIGINT, then drain."""
    local = ray_settings.ray_address is None
    if local:
        # Ray resolves "127.0.0.1" to the machine's outward address unless this is off: with it,
        # the local instance's node address, and so all its own traffic, stays on loopback.
        os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
    import ray
    from ray import serve

    from ._app import build_app

    if local:
        ray.init(
            address="local",
            include_dashboard=False,
            num_cpus=num_cpus,
            _node_ip_address="127.0.0.1",
            configure_logging=False,
        )
    else:
        ray.init(address=ray_settings.ray_address, configure_logging=False)
    stop = threading.Event()
    previous = {s: signal.signal(s, lambda *_: stop.set()) for s in (signal.SIGTERM, signal.SIGINT)}
    try:
        serve.start(http_options={"host": settings.host, "port": settings.port})
        serve.run(
            build_app(settings, ray_settings),
            name=ray_settings.app_name,
            route_prefix="/",
            logging_config={"log_level": settings.log_level.upper(), "enable_access_log": False},
        )
        log.info(
            "serving %s on http://%s:%d with %d replica(s) on Ray",
            settings.model or "SmolLM2-135M-Instruct",
            settings.host,
            settings.port,
            ray_settings.replicas,
        )
        print(f"llm-batcher: ready on http://{settings.host}:{settings.port}", flush=True)
        stop.wait()
        log.info("stopping: the replicas drain (up to %.0f s)", settings.batch.drain_timeout_s)
        serve.delete(ray_settings.app_name)
        if local:
            serve.shutdown()  # type: ignore[no-untyped-call]
        return 0
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)
        ray.shutdown()
