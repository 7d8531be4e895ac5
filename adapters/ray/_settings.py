"""How the replicas are laid out on Ray: a small frozen value object, and the Serve options it implies.

Serve's defaults suit short stateless requests, not a batcher: ``max_ongoing_requests=5`` would cap
every batch at 5. Here a replica accepts a full batch per engine plus a full queue
(:func:`max_ongoing_requests`), Serve's own queue in front of the replicas is bounded by the same
``max_queue``, and the graceful shutdown of a replica waits as long as its batcher drains.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from batcher import BatchConfig, InvalidRequest

__all__ = ["RaySettings"]


@dataclass(frozen=True, kw_only=True)
class RaySettings:
    """Replicas, devices and autoscaling of ``serve --replicas`` (flags: see ``add_arguments``).

    ``replicas``
        replicas to start with (the fixed count when autoscaling is off).
    ``ray_address``
        an existing cluster to join (``auto``, ``ray://...``, ``host:port``); ``None`` starts a
        local Ray bound to 127.0.0.1 for the life of the command.
    ``devices``
        devices per replica, one engine each: GPUs when the device is ``cuda``, else CPU engines.
    ``min_replicas`` / ``max_replicas``
        autoscaling bounds; autoscaling is on when ``max_replicas`` is set.
    ``target_work``
        queued plus running requests per replica the autoscaler aims at (default: a full batch per
        engine, ``devices * max_batch_size``).
    ``cpus_per_replica``
        CPUs Ray reserves for each replica (its device threads and its tokenizer).
    """

    replicas: int = 1
    ray_address: str | None = None
    devices: int = 1
    min_replicas: int | None = None
    max_replicas: int | None = None
    target_work: float | None = None
    upscale_delay_s: float = 5.0
    downscale_delay_s: float = 30.0
    cpus_per_replica: float = 1.0
    metrics_period_s: float = 1.0
    app_name: str = "llm-batcher"

    def __post_init__(self) -> None:
        for name in ("replicas", "devices"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise InvalidRequest(f"RaySettings.{name} must be an integer >= 1, got {value!r}", field=name)
        for name in ("upscale_delay_s", "downscale_delay_s", "cpus_per_replica"):
            value = getattr(self, name)
            if not (isinstance(value, (int, float)) and math.isfinite(value) and value >= 0):
                raise InvalidRequest(f"RaySettings.{name} must be a number >= 0, got {value!r}", field=name)
        if not self.metrics_period_s > 0:
            raise InvalidRequest(
                f"RaySettings.metrics_period_s must be > 0, got {self.metrics_period_s!r}",
                field="metrics_period_s",
            )
        if self.target_work is not None and not self.target_work > 0:
            raise InvalidRequest(
                f"RaySettings.target_work must be > 0, got {self.target_work!r}", field="target_work"
            )
        self._check_bounds()

    def _check_bounds(self) -> None:
        if self.max_replicas is None:
            if self.min_replicas is not None:
                raise InvalidRequest(
                    "min_replicas needs max_replicas: set --max-replicas to turn autoscaling on",
                    field="min_replicas",
                )
            return
        low = 1 if self.min_replicas is None else self.min_replicas
        if not 0 <= low <= self.replicas <= self.max_replicas:
            raise InvalidRequest(
                f"autoscaling needs 0 <= min_replicas ({low}) <= replicas ({self.replicas}) <= "
                f"max_replicas ({self.max_replicas}): fix the bounds",
                field="max_replicas",
            )

    @property
    def autoscaling(self) -> bool:
        return self.max_replicas is not None

    def max_ongoing_requests(self, batch: BatchConfig) -> int:
        """Requests Serve lets into one replica: a full batch per engine plus a full queue."""
        return self.devices * batch.max_batch_size + batch.max_queue

    def autoscaling_config(self, batch: BatchConfig) -> dict[str, Any] | None:
        """Serve's autoscaling config, scaling on the batchers' queued and running requests."""
        if not self.autoscaling:
            return None
        return {
            "min_replicas": 1 if self.min_replicas is None else self.min_replicas,
            "initial_replicas": self.replicas,
            "max_replicas": self.max_replicas,
            "target_ongoing_requests": self.target_work or self.devices * batch.max_batch_size,
            "upscale_delay_s": self.upscale_delay_s,
            "downscale_delay_s": self.downscale_delay_s,
            "policy": {"policy_function": "batcher.adapters.ray._autoscale:queue_depth_policy"},
        }

    def deployment_options(self, batch: BatchConfig, *, gpus: bool) -> dict[str, Any]:
        """Options of the replicas' Serve deployment (``BatcherReplica.options(**...)``)."""
        scaling: dict[str, Any] = (
            {"autoscaling_config": self.autoscaling_config(batch)}
            if self.autoscaling
            else {"num_replicas": self.replicas}
        )
        return {
            **scaling,
            "max_ongoing_requests": self.max_ongoing_requests(batch),
            "max_queued_requests": batch.max_queue,
            # Serve waits this long for a stopping replica's streams, then runs its drain.
            "graceful_shutdown_timeout_s": batch.drain_timeout_s + 5.0,
            "graceful_shutdown_wait_loop_s": 0.5,
            "health_check_period_s": 2.0,
            "health_check_timeout_s": 10.0,
            "ray_actor_options": {
                "num_cpus": self.cpus_per_replica,
                "num_gpus": self.devices if gpus else 0,
            },
            "request_router_config": {
                "request_router_class": "batcher.adapters.ray._router:LeastQueuedRouter",
                "request_routing_stats_period_s": self.metrics_period_s,
                "request_routing_stats_timeout_s": max(1.0, self.metrics_period_s),
            },
        }
