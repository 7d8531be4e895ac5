"""Batching configuration: a small frozen value object, validated on construction."""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field

from ._errors import InvalidRequest

__all__ = ["BatchConfig"]


@dataclass(frozen=True, slots=True, kw_only=True)
class BatchConfig:
    """How a :class:`~batcher.Batcher` batches. Every field is keyword-only.

    ``max_batch_size``
        sequences (or one-shot items) per step, per engine.
    ``max_batch_tokens``
        the KV budget per engine: the sum over running sequences of prompt length + ``max_tokens``
        never exceeds it (reserved up front, so a running sequence never runs out of room). ``None``
        takes the backend's own ``max_batch_tokens`` attribute if it has one, else no limit. When
        both are set, the smaller wins.
    ``max_prefill_tokens``
        the prompt tokens one step may prefill, per engine: a newcomer whose prompt would push the
        step past it waits for the next step, so a burst of long prompts does not stall every
        running sequence for one huge step. Only tokens the backend computes count: a prefix it
        expects to serve from its cache (``PreparedPrompt.cached_tokens``) does not. A step's first
        newcomer is always admitted, however long. ``None``: no limit.
    ``max_queue``
        requests waiting (not yet running) per batcher; one more is refused at once with
        :class:`~batcher.Overloaded`.
    ``batch_window_s``
        how long an *idle* engine waits for a first batch to fill. It does not wait when the queue
        already holds a full batch, and never while sequences are running: newcomers join the
        running batch at the next step. For one-shot functions this is the max wait.
    ``priority_aging_s``
        seconds of waiting that raise a request's effective priority by one, so a flood of
        high-priority work cannot starve a low-priority request. ``math.inf`` turns aging off.
    ``default_max_tokens`` / ``max_tokens_limit``
        ``max_tokens`` when the caller gives none, and the largest the batcher accepts.
    ``drain_timeout_s``
        how long ``async with`` waits on exit for running requests before ending them.
    ``tenant_weights``
        each tenant's share of the batch (weighted fair queuing over the ``tenant=`` of each
        request); a tenant not listed weighs 1. Under saturation, tenants get tokens in
        proportion to their weights.
    ``tenant_max_queue``
        requests one tenant may have waiting; one more is refused with
        :class:`~batcher.Overloaded` (``None``: only ``max_queue`` applies).
    ``ttft_slo_s``
        a time-to-first-token objective: a newcomer whose predicted time to first token (from
        the step-cost model the engine learns, and the queue ahead of it) exceeds it is refused
        at once with :class:`~batcher.Overloaded` rather than queued to miss it; the batch window
        never widens past it. ``None``: no objective.
    ``tenant_metrics_top_k``
        tenants exported by name in the per-tenant metrics (the heaviest); the others are
        summed as ``tenant="other"``, so a flood of tenant names cannot explode cardinality.
    """

    max_batch_size: int = 32
    max_batch_tokens: int | None = None
    max_prefill_tokens: int | None = 2048
    max_queue: int = 256
    batch_window_s: float = 0.002
    priority_aging_s: float = 1.0
    default_max_tokens: int = 256
    max_tokens_limit: int = 32768
    drain_timeout_s: float = 30.0
    tenant_weights: Mapping[str, float] = field(default_factory=dict, hash=False)
    tenant_max_queue: int | None = None
    tenant_metrics_top_k: int = 10
    ttft_slo_s: float | None = None

    def __post_init__(self) -> None:
        _positive_int("max_batch_size", self.max_batch_size)
        if self.max_batch_tokens is not None:
            _positive_int("max_batch_tokens", self.max_batch_tokens)
        if self.max_prefill_tokens is not None:
            _positive_int("max_prefill_tokens", self.max_prefill_tokens)
        _positive_int("max_queue", self.max_queue)
        _positive_int("default_max_tokens", self.default_max_tokens)
        _positive_int("max_tokens_limit", self.max_tokens_limit)
        if self.default_max_tokens > self.max_tokens_limit:
            raise InvalidRequest(
                f"default_max_tokens ({self.default_max_tokens}) exceeds max_tokens_limit "
                f"({self.max_tokens_limit}): lower it or raise max_tokens_limit",
                field="default_max_tokens",
            )
        _non_negative("batch_window_s", self.batch_window_s, finite=True)
        _non_negative("drain_timeout_s", self.drain_timeout_s, finite=True)
        _non_negative("priority_aging_s", self.priority_aging_s, finite=False)
        if self.tenant_max_queue is not None:
            _positive_int("tenant_max_queue", self.tenant_max_queue)
        _positive_int("tenant_metrics_top_k", self.tenant_metrics_top_k)
        if self.ttft_slo_s is not None:
            _non_negative("ttft_slo_s", self.ttft_slo_s, finite=True)
        for tenant, weight in self.tenant_weights.items():
            ok = isinstance(weight, (int, float)) and not isinstance(weight, bool)
            if not isinstance(tenant, str) or not ok or not (math.isfinite(weight) and weight > 0):
                raise InvalidRequest(
                    f"BatchConfig.tenant_weights[{tenant!r}] must be a finite number > 0, got {weight!r}",
                    field="tenant_weights",
                )
        if self.priority_aging_s == 0:
            raise InvalidRequest(
                "priority_aging_s must be > 0 (use math.inf to turn aging off), got 0",
                field="priority_aging_s",
            )


def _positive_int(name: str, value: object) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise InvalidRequest(f"BatchConfig.{name} must be an integer >= 1, got {value!r}", field=name)


def _non_negative(name: str, value: object, *, finite: bool) -> None:
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and value >= 0
    if ok and finite and not math.isfinite(value):  # type: ignore[arg-type]
        ok = False
    if not ok or (isinstance(value, float) and math.isnan(value)):
        kind = "a finite number" if finite else "a number"
        raise InvalidRequest(f"BatchConfig.{name} must be {kind} >= 0, got {value!r}", field=name)
