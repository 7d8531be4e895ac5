"""Deliberately broken backends for ``selftest``: each step, the first two running rows get each
other's token (the backends' own state stays right, so only what the clients see is wrong)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from batcher.backend import NewSequence, StepResult
from batcher.testing import FakeBackend


def swap_two_rows(result: StepResult) -> StepResult:
    """Swap the tokens and text of the first two outputs that are not their rows' last."""
    live = [o for o in result.outputs if o.finish_reason is None]
    if len(live) >= 2:
        a, b = live[0], live[1]
        a.token_ids, b.token_ids = b.token_ids, a.token_ids
        a.text, b.text = b.text, a.text
    return result


class LeakyFake(FakeBackend):
    """The fake backend (1 ms steps), leaking tokens between two rows."""

    def __init__(self, model: object, *, dtype: object, device: object) -> None:
        super().__init__(step_time_s=0.001)

    def step(self, admit: Sequence[NewSequence], drop: Sequence[int]) -> StepResult:
        return swap_two_rows(super().step(admit, drop))


def leaky_hf(model: Any, *, dtype: Any, device: Any) -> Any:
    """An :class:`HFBackend` subclass leaking tokens between two rows (torch loads here only)."""
    from batcher.adapters import HFBackend

    class LeakyHF(HFBackend):
        def step(self, admit: Sequence[NewSequence], drop: Sequence[int]) -> StepResult:
            return swap_two_rows(super().step(admit, drop))

    return LeakyHF(model, dtype=dtype, device=device)
