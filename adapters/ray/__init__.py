"""Replicas on Ray Serve (the ``[ray]`` extra): ``llm-batcher serve --replicas N``.

Layout (``import batcher.adapters.ray`` imports no Ray; the names below load it on use):
    _settings   RaySettings: replicas, devices, autoscaling; the Serve options they imply
    _cli        add_arguments / maybe_run: the ``serve`` CLI hook, and the Ray lifecycle of a run
    _app        build_app (Python) and app_builder (``serve run``, Serve config files)
    _front      Front: the HTTP ingress relaying to the replicas; a replica lost mid-stream
                ends its streams with an error event and ``[DONE]``
    _replica    BatcherReplica: the example server's app (one Batcher) in each replica
    _router     LeastQueuedRouter: Serve request router on the batchers' queued work
    _autoscale  queue_depth_policy: Serve autoscaling policy on the batchers' queue depth
    _metrics    MetricsHub: every replica's metrics, labelled ``replica``, on the proxy's /metrics

See docs/ray.md for the design, the scrape, a Serve config file and a KubeRay sketch.
"""

from __future__ import annotations

from importlib import import_module
from typing import TYPE_CHECKING, Any

from ._cli import add_arguments, maybe_run
from ._settings import RaySettings

if TYPE_CHECKING:
    from ._app import app_builder, build_app

__all__ = ["RaySettings", "add_arguments", "app_builder", "build_app", "maybe_run"]


def __getattr__(name: str) -> Any:
    if name not in ("app_builder", "build_app"):
        raise AttributeError(f"module 'batcher.adapters.ray' has no attribute {name!r}")
    try:
        value = getattr(import_module("._app", __name__), name)
    except ModuleNotFoundError as e:
        raise ModuleNotFoundError(
            f"batcher.adapters.ray.{name} needs {e.name!r}: install it with `pip install 'llm-batcher[ray]'`"
        ) from e
    globals()[name] = value
    return value
