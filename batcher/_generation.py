"""Generation requests: ``stream`` and ``generate`` over one engine per generation backend.

A call is validated (:mod:`batcher._options`), admitted (:mod:`batcher._admission`, the gate
one-shot calls pass too) and handed to the least-loaded :class:`GenerationEngine` as a new
request; what comes back is a :class:`TokenStream`, which ``generate`` drains.
"""

from __future__ import annotations

import itertools
from collections.abc import Coroutine, Sequence
from typing import Any

from ._admission import Admission
from ._backend import GenerationBackend
from ._config import BatchConfig
from ._continuous import GenerationEngine
from ._errors import InvalidRequest
from ._options import Options, Parsed
from ._request import GenRequest
from ._stats import DrainRate
from ._stream import TokenStream, completion
from ._types import Completion, Prompt, SamplingParams

__all__ = ["GenerationBatcher"]


class GenerationBatcher:
    """Validate, admit, hand over (see module doc)."""

    def __init__(self, backends: Sequence[GenerationBackend], config: BatchConfig) -> None:
        drain = DrainRate()
        self._seq = itertools.count(1)  # seq_ids are unique per batcher, over its engines
        new_id = self._seq.__next__
        self.engines = [GenerationEngine(i, b, config, drain, new_id) for i, b in enumerate(backends)]
        self.admission = Admission(config, self.engines, drain)
        self._options = Options(config)

    def stream(self, prompt: object, options: dict[str, Any]) -> TokenStream:
        """Validate now; admit when the stream is entered or first iterated."""
        parsed = self._parse(prompt, options)
        return TokenStream(lambda: self._admit(*parsed))

    def generate(self, prompt: object, options: dict[str, Any]) -> Coroutine[Any, Any, Completion]:
        """Validate and admit when awaited, then drain the request's stream."""
        return completion(TokenStream(lambda: self._admit(*self._parse(prompt, options))))

    def _parse(self, prompt: object, options: dict[str, Any]) -> Parsed:
        try:
            return self._options.parse(prompt, options)
        except InvalidRequest:
            self.admission.refuse("rejected")
            raise

    def _admit(
        self, prompt: Prompt, params: SamplingParams, deadline_s: float | None, priority: int, tenant: str
    ) -> GenRequest:
        engine = self.admission.admit(tenant)
        return engine.admit(next(self._seq), prompt, params, priority, deadline_s, tenant)
