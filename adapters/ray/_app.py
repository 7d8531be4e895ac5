"""The Serve application: Front (HTTP ingress) → BatcherReplica (N replicas), and the MetricsHub.

``build_app(settings, ray_settings)`` is what ``serve --replicas`` runs; ``app_builder(args)`` is
the same for ``serve run batcher.adapters.ray:app_builder key=value...`` and Serve config files
(``import_path: batcher.adapters.ray:app_builder`` with ``args:``), where every ``llm-batcher
serve`` flag and every Ray flag is an argument named like its flag (``max_batch_size: 64``,
``replicas: 2``).
"""

from __future__ import annotations

import dataclasses
from typing import Any, cast

from ray.serve import Application, Deployment

from batcher import BatchConfig, InvalidRequest

from ..server import ServerSettings
from ..server._auth import ApiKey, parse_key_file
from ._front import Front
from ._metrics import MetricsHub, hub_options
from ._replica import BatcherReplica
from ._settings import RaySettings

__all__ = ["app_builder", "build_app"]


_FRONT_BODY_CAP = 16 << 20


def build_app(settings: ServerSettings, ray_settings: RaySettings) -> Application:
    """The application: ``serve.run(build_app(...), route_prefix="/")`` serves the OpenAI API."""
    gpus = (settings.device or "").startswith("cuda")
    # serve.deployment turns each class into a Deployment, which mypy cannot see: hence the casts.
    hub = cast(Deployment, MetricsHub).bind(**hub_options(ray_settings.metrics_period_s))
    replicas = (
        cast(Deployment, BatcherReplica)
        .options(**ray_settings.deployment_options(settings.batch, gpus=gpus))
        .bind(settings, ray_settings.devices, hub, ray_settings.metrics_period_s)
    )
    # The front only bounds what it buffers; each replica's gate answers 413 past the limit its
    # server derives from the model (the settings give one only when the user set it).
    return cast(Deployment, Front).bind(replicas, hub, settings.max_body_bytes or _FRONT_BODY_CAP)


def app_builder(args: dict[str, Any]) -> Application:
    """``serve run`` / config-file entry: ``args`` are flag names (dashes or underscores) → values."""
    values = {k.replace("-", "_"): v for k, v in args.items()}
    batch = {f.name: values.pop(f.name) for f in dataclasses.fields(BatchConfig) if f.name in values}
    ray_names = {f.name for f in dataclasses.fields(RaySettings)} - {"ray_address"}
    ray = {k: values.pop(k) for k in list(values) if k in ray_names}
    server_names = {f.name for f in dataclasses.fields(ServerSettings)} - {"batch", "host", "port"}
    keys = _api_keys(values.pop("api_key", None), values.pop("api_key_file", None))
    if keys:
        values["api_keys"] = keys
    unknown = sorted(set(values) - server_names)
    if unknown:
        raise InvalidRequest(
            f"unknown application argument(s) {unknown}: use the names of BatchConfig, "
            "ServerSettings or RaySettings fields",
            field=unknown[0],
        )
    settings = ServerSettings(
        batch=BatchConfig(**_typed(BatchConfig, batch)), **_typed(ServerSettings, values)
    )
    return build_app(settings, RaySettings(**_typed(RaySettings, ray)))


def _api_keys(key: str | None, key_file: str | None) -> tuple[ApiKey, ...]:
    """``api_key`` / ``api_key_file`` as the CLI takes them (an empty key is refused, as there)."""
    keys = list(parse_key_file(key_file)) if key_file else []
    if key is not None:
        if not str(key).strip():
            raise InvalidRequest("api_key is empty: an empty key would let everyone in", field="api_key")
        keys.append(ApiKey(str(key)))
    return tuple(keys)


def _typed(cls: type, values: dict[str, Any]) -> dict[str, Any]:
    """``serve run k=v`` passes strings: convert those of int and float fields (``int | None``...)."""
    kinds = {f.name: str(f.type) for f in dataclasses.fields(cls)}
    out: dict[str, Any] = {}
    for name, value in values.items():
        kind = kinds.get(name, "")
        if isinstance(value, str) and kind.startswith(("int", "float")):
            value = (int if kind.startswith("int") else float)(value)
        out[name] = value
    return out
