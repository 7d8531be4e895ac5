"""Serve autoscaling policy on the batchers' own load: queued plus running requests.

Each replica reports ``record_autoscaling_stats() -> {"batcher_work": queue_depth + running}``;
Serve averages it over ``look_back_period_s`` and calls :func:`queue_depth_policy` on its control
loop. The desired count is the deployment's total work over ``target_ongoing_requests`` per
replica (a full batch per engine by default), so replicas are added when batches are full and the
queues grow, and removed when the work fits in fewer full batches. Serve applies the bounds and
the up/down delays around it. A replica that has not reported yet counts with Serve's own view
of its ongoing requests.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from ray.serve.config import AutoscalingContext

__all__ = ["WORK_METRIC", "queue_depth_policy"]

#: The custom metric each replica reports (see ``BatcherReplica.record_autoscaling_stats``).
WORK_METRIC = "batcher_work"


def queue_depth_policy(ctx: AutoscalingContext) -> tuple[float, dict[str, Any]]:
    """Desired replicas: the batchers' total work over the target work per replica."""
    if ctx.current_num_replicas == 0:
        return ctx.target_num_replicas, {}
    reported = (ctx.aggregated_metrics or {}).get(WORK_METRIC, {})
    work = sum(reported.values()) if len(reported) >= ctx.current_num_replicas else ctx.total_num_requests
    assert ctx.config is not None  # Serve always passes the deployment's autoscaling config
    return work / ctx.config.get_target_ongoing_requests(), {}
