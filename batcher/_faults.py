"""Fault isolation: a step that raised is split until the request to blame fails alone.

The backend may lose every running sequence when a step raises (the protocol lets it reset its
batch), so the pipeline puts them all back in the queue, to resume from their prompt plus the
tokens already delivered, under fresh ids. Then:

* **out of memory** (``MemoryError``, or torch's ``OutOfMemoryError``, told by type name: the core
  never imports torch): nobody is to blame; the batch cap and the token budget halve, and the
  requests run again in smaller batches (:class:`MemoryLimits`: after ``GROW_AFTER`` clean steps
  they grow back by an eighth at a time, never to a size that ran out of memory, so a transient
  shortage does not cost throughput for good and a real limit is found, not undershot by half);
* **any other error**: the sequences of the step are suspects. They are split in halves, and each
  half is *probed*: admitted alone into a step (with only requests already cleared running). A
  probe that passes a step clears its half; a probe that raises is split again; a probe of one
  request that raises fails that request, alone. Everyone else carries on.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Sequence
from dataclasses import replace

from ._backend import NewSequence
from ._errors import failed
from ._request import WAITING, GenRequest

__all__ = ["GROW_AFTER", "Isolation", "MemoryLimits", "blamed", "out_of_memory", "resume"]

#: ``MemoryError`` and ``torch.cuda.OutOfMemoryError`` (also ``torch.OutOfMemoryError``).
_OOM_NAMES = frozenset({"MemoryError", "OutOfMemoryError"})


def out_of_memory(error: BaseException) -> bool:
    """Whether ``error`` says the device (or the host) ran out of memory."""
    return any(cls.__name__ in _OOM_NAMES for cls in type(error).__mro__)


#: Clean steps after which limits shrunk by out-of-memory errors grow back one notch.
GROW_AFTER = 32


class MemoryLimits:
    """The batch cap and KV token budget an engine admits under: the configured ones until a step
    runs out of memory, then halved (never below the largest running request, which must fit).
    Every ``GROW_AFTER`` clean steps in a row they grow back by an eighth (at least one row), up
    to just below the smallest batch and reservation that ran out of memory."""

    __slots__ = ("_clean", "_max_batch", "_max_tokens", "batch_cap", "token_budget")

    def __init__(self, batch_cap: int, token_budget: int | None) -> None:
        self.batch_cap, self.token_budget = batch_cap, token_budget
        self._max_batch, self._max_tokens = batch_cap, token_budget  # may be tried again
        self._clean = 0

    def shrink(self, batch: int, reserved: int, largest: int) -> None:
        """A step of ``batch`` sequences reserving ``reserved`` tokens ran out of memory."""
        self._max_batch = max(1, min(self._max_batch, batch - 1))
        self.batch_cap = max(1, min(self.batch_cap, batch) // 2)
        self.token_budget = max(largest, reserved // 2)
        self._max_tokens = max(largest, min(self._max_tokens or reserved, reserved - 1))
        self._clean = 0

    def passed(self) -> None:
        """A step ran without running out of memory."""
        if self.batch_cap >= self._max_batch and self.token_budget == self._max_tokens:
            return
        self._clean += 1
        if self._clean < GROW_AFTER:
            return
        self._clean = 0
        self.batch_cap = min(self._max_batch, self.batch_cap + max(1, self.batch_cap // 8))
        if self.token_budget is not None and self._max_tokens is not None:
            self.token_budget = min(self._max_tokens, self.token_budget + max(1, self.token_budget // 8))


class Isolation:
    """The suspects of failed steps, in groups, and the group the running step probes."""

    __slots__ = ("_groups", "_probe")

    def __init__(self) -> None:
        self._groups: deque[list[GenRequest]] = deque()
        self._probe: set[GenRequest] = set()

    @property
    def active(self) -> bool:
        """Whether suspects remain: then each step admits only the next group's requests."""
        return bool(self._groups or self._probe)

    def next_group(self) -> list[GenRequest]:
        """The waiting requests of the next group to probe (ended ones leave their group)."""
        while self._groups:
            group = [r for r in self._groups[0] if r.stage == WAITING]
            if group:
                self._groups[0] = group
                return group
            self._groups.popleft()
        return []

    def probing(self, admitted: Sequence[GenRequest]) -> None:
        """These requests of the head group join the next step: it probes them."""
        if not admitted or not self._groups:
            return
        self._probe.update(admitted)
        chosen = set(admitted)
        rest = [r for r in self._groups[0] if r not in chosen]
        if rest:
            self._groups[0] = rest
        else:
            self._groups.popleft()

    def passed(self) -> None:
        """A step returned: the requests it probed are cleared."""
        self._probe.clear()

    def blame(self, lost: Sequence[GenRequest]) -> GenRequest | None:
        """A step of ``lost`` raised (not out of memory): the one request to fail, if found;
        else its suspects (the probed ones, or all) are split in halves to probe first."""
        suspects = [r for r in lost if r in self._probe] or list(lost)
        self._probe.clear()
        if len(suspects) == 1:
            return suspects[0]
        half = len(suspects) // 2
        self._groups.extendleft([suspects[half:], suspects[:half]])
        return None

    def forget_probe(self) -> None:
        """Out of memory is nobody's fault: the probed requests are neither blamed nor cleared."""
        if self._probe:
            self._groups.appendleft(list(self._probe))
            self._probe.clear()


def resume(r: GenRequest) -> NewSequence:
    """What the backend admits for ``r``: its prompt, or, resumed after a fault, its prompt and
    the tokens it already has, with the tokens still to come as ``max_tokens``."""
    if not r.produced:
        return NewSequence(r.seq_id, r.prompt_ids, r.params)
    params = replace(r.params, max_tokens=r.params.max_tokens - r.produced)
    return NewSequence(r.seq_id, (*r.prompt_ids, *r.generated), params, resumed=r.produced)


def blamed(cause: BaseException, *, oom: bool) -> BaseException:
    """The error of the request found to blame."""
    if oom:
        return failed("out of memory with this request alone: lower max_tokens or shorten the prompt", cause)
    return failed("the backend failed every step this request was in, alone too; the others went on", cause)
