"""Counting the kernels a backend step launches: the "ops per step per layer" figure.

A step's host cost on a GPU is roughly its number of kernel launches, so the figure that shows
whether a step's cost grows with its newcomers is the number of attention calls and copies per
layer. :class:`OpCounter` counts the aten ops under it (a ``TorchDispatchMode``: it sees every
op below autograd, CPU or CUDA alike); :func:`wave_ops` lets waves of newcomers join a running
batch and reports each step's figure. The benchmark prints it and a test bounds it.
"""

from __future__ import annotations

import random
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import torch
from torch.utils._python_dispatch import TorchDispatchMode

from batcher.backend import NewSequence, SamplingParams, StepResult

__all__ = ["OpCounter", "StepOps", "wave_ops"]


class OpCounter(TorchDispatchMode):  # type: ignore[no-untyped-call]
    """Counts aten ops by name (``copy_``, ``index_put_``...) while active."""

    def __init__(self) -> None:
        super().__init__()  # type: ignore[no-untyped-call]
        self.counts: Counter[str] = Counter()

    def __torch_dispatch__(
        self, func: Any, types: Any, args: Sequence[Any] = (), kwargs: dict[str, Any] | None = None
    ) -> Any:
        self.counts[func.overloadpacket.__name__] += 1
        return func(*args, **(kwargs or {}))

    @property
    def attention(self) -> int:
        return sum(c for name, c in self.counts.items() if "scaled_dot_product" in name)

    @property
    def copies(self) -> int:
        return self.counts["copy_"]

    @property
    def index_writes(self) -> int:
        return sum(self.counts[name] for name in ("index_put_", "index_copy_", "_index_put_impl_"))


@dataclass(frozen=True, slots=True)
class StepOps:
    """One step's ops per layer: its newcomers, rows after it, attention calls, ``copy_``, indexed
    writes, and every aten op together."""

    newcomers: int
    rows: int
    attention: float
    copies: float
    index_writes: float
    total: float
    cached_tokens: int = 0  # prompt tokens the step took from a prefix cache


class _Stepper(Protocol):
    @property
    def live_sequences(self) -> int: ...

    def step(self, admit: Sequence[NewSequence], drop: Sequence[int]) -> StepResult: ...


def wave_ops(
    backend: _Stepper,
    layers: int,
    waves: Sequence[int] = (1, 7, 24, 64),
    *,
    vocab: int = 40_000,
    seed: int = 0,
    head: Sequence[int] = (),
) -> list[StepOps]:
    """Let ``waves`` of newcomers (random prompts of 4..40 tokens, after ``head`` if given) join a
    running batch, a decode step between waves, and count each step's ops per layer; every
    sequence is dropped at the end."""
    rng = random.Random(seed)
    out: list[StepOps] = []
    next_id = 0
    for size in waves:
        for admit in (size, 0):
            new = [
                NewSequence(
                    next_id + i,
                    [*head, *(rng.randrange(200, vocab) for _ in range(rng.randrange(4, 41)))],
                    SamplingParams(max_tokens=64),
                )
                for i in range(admit)
            ]
            next_id += admit
            with torch.inference_mode(), OpCounter() as ops:
                result = backend.step(new, ())
            out.append(
                StepOps(
                    admit,
                    backend.live_sequences,
                    ops.attention / layers,
                    ops.copies / layers,
                    ops.index_writes / layers,
                    sum(ops.counts.values()) / layers,
                    result.cached_tokens,
                )
            )
    backend.step((), range(next_id))
    return out
