"""Per-sequence state of :class:`~batcher.adapters.HFBackend` and how one new token ends it.

A row's keys/values live in the KV slab (``_cache``); this is the rest: sampling parameters and
generator, incremental detokenizer, stop-string matcher, grammar state (structured output),
position, token count. :meth:`Row.advance` turns one token into a
:class:`~batcher.backend.SeqOutput`: EOS ends with ``"stop"`` (its text is not shown), a stop string
ends with ``"stop"`` before the stop string, a complete structured output that can take nothing
more but EOS with ``"stop"`` (at once: no step is spent on the EOS), ``max_tokens`` (or the context
end) with ``"length"``; text still held back (an incomplete character, a possible stop-string
prefix) is released when the sequence ends.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from batcher.backend import FinishReason, SamplingParams, SeqOutput, StopMatcher

from ._detok import Detokenizer
from ._grammar import Matcher
from ._sampling import RowSampler

__all__ = ["Row"]


@dataclass(slots=True, eq=False)
class Row:
    """What the backend keeps per running sequence (its KV lives in the slab row)."""

    seq_id: int
    params: SamplingParams
    sampler: RowSampler | None  # None: greedy
    detok: Detokenizer
    stop: StopMatcher
    position: int  # position id of the next token fed to the model
    last: int = -1  # the token to feed next
    produced: int = 0
    matcher: Matcher | None = None  # the response_format's grammar state; None: free text
    prompt: tuple[int, ...] = ()  # its prompt's token ids (rows sharing a prefix: ``_attention.Shared``)

    @classmethod
    def new(
        cls,
        seq_id: int,
        prompt_ids: Sequence[int],
        params: SamplingParams,
        tokenizer: Any,
        special: frozenset[int],
        matcher: Matcher | None = None,
    ) -> Row:
        sampler = None
        if not params.greedy:
            sampler = RowSampler(
                temperature=params.temperature,
                top_k=params.top_k,
                top_p=params.top_p,
                seed=params.seed,
                min_p=params.min_p,
            )
        detok = Detokenizer(tokenizer, prompt_ids, special)
        stop = StopMatcher(params.stop)
        return cls(
            seq_id,
            params,
            sampler,
            detok,
            stop,
            position=len(prompt_ids),
            matcher=matcher,
            prompt=tuple(prompt_ids),
        )

    def advance(self, token: int, eos: frozenset[int], max_context: int) -> SeqOutput:
        """Record ``token``; return its text delta and, if the sequence ends here, why."""
        self.last = token
        self.produced += 1
        reason: FinishReason | None = None
        if token in eos:
            text, stopped = self.stop.feed(self.detok.flush())
            reason = "stop"
        else:
            text, stopped = self.stop.feed(self.detok.feed(token))
            complete = self._complete(token)
            if stopped:
                reason = "stop"
            elif complete or self.produced >= self.params.max_tokens or self.position >= max_context:
                more, stopped = self.stop.feed(self.detok.flush())
                text += more
                reason = "stop" if stopped or complete else "length"
        if reason is not None and not stopped:
            text += self.stop.flush()
        return SeqOutput(self.seq_id, (token,), text, reason)

    def _complete(self, token: int) -> bool:
        """Advance the grammar (if any) by ``token``: whether the output is now complete and can
        take nothing more but EOS."""
        if self.matcher is None:
            return False
        self.matcher.advance(token)
        return self.matcher.finished
