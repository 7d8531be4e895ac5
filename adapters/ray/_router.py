"""A Serve request router that sends each request to the replica with the least queued work.

Serve's default router probes two random replicas and takes the one with fewer ongoing requests:
with two replicas that is already "the less busy one", with more it can miss the idlest. This
router ranks *every* candidate by its queued work: the larger of what its batcher last reported
(``record_routing_stats``: requests waiting in its queue plus running, refreshed every
``request_routing_stats_period_s``, and counting other routers' requests too) and the requests
Serve's queue-length cache knows it holds (fresh after each request this router sends). It offers
them in that order; Serve sends the request to the first one with room under
``max_ongoing_requests``.
"""

from __future__ import annotations

from ray.serve.request_router import (
    FIFOMixin,
    PendingRequest,
    RequestRouter,
    RunningReplica,
)

__all__ = ["LeastQueuedRouter"]


class LeastQueuedRouter(FIFOMixin, RequestRouter):
    """Ranks replicas by queued plus running requests, least first (see the module doc)."""

    async def choose_replicas(
        self,
        candidate_replicas: list[RunningReplica],
        pending_request: PendingRequest | None = None,
    ) -> list[list[RunningReplica]]:
        return [[r] for r in sorted(candidate_replicas, key=self._work)]

    def _work(self, replica: RunningReplica) -> float:
        reported = float(replica.routing_stats.get("work", 0))
        ongoing = self.replica_queue_len_cache.get(replica.replica_id)
        return max(reported, float(ongoing)) if ongoing is not None else reported
