"""What a model backend implements (public as :mod:`batcher.backend`): the four verbs of a
:class:`GenerationBackend`, or one :data:`BatchFunction` for one-shot batches; and the values they
exchange with the engine.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Literal, Protocol, TypeVar, runtime_checkable

from ._errors import InvalidRequest
from ._types import FinishReason, Logprobs, Prompt, SamplingParams, slot_setters

__all__ = [
    "BatchFunction",
    "GenerationBackend",
    "NewSequence",
    "PrepareRequest",
    "PreparedPrompt",
    "SeqOutput",
    "StepResult",
    "backend_kind",
]

In = TypeVar("In")
Out = TypeVar("Out")

#: A one-shot batch function ``list[In] -> list[Out]`` (embeddings, classifiers: the job of Ray
#: Serve's ``@serve.batch``): called on the device thread with up to ``max_batch_size`` items, it
#: returns one output per item, in order; an ``Exception`` instance as an output fails just that item.
BatchFunction = Callable[[list[In]], Sequence[Out]]


@dataclass(frozen=True, slots=True)
class PrepareRequest:
    """One admitted request handed to :meth:`GenerationBackend.prepare`."""

    prompt: Prompt
    params: SamplingParams

    def __init__(self, prompt: Prompt, params: SamplingParams) -> None:
        # One per request on the loop's hot path: set the slots directly (a frozen dataclass's
        # generated __init__ goes through object.__setattr__, twice as slow).
        _set_prepare_prompt(self, prompt)
        _set_prepare_params(self, params)


@dataclass(frozen=True, slots=True)
class PreparedPrompt:
    """A tokenized prompt. ``token_ids`` are what the model will prefill; ``cached_tokens`` how many
    of the first of them the backend expects to serve from a prefix cache (a hint the scheduler
    charges less for: it may be stale by the time the sequence is admitted)."""

    token_ids: Sequence[int]
    cached_tokens: int = 0


@dataclass(frozen=True, slots=True)
class NewSequence:
    """A sequence to admit in :meth:`GenerationBackend.step`. ``seq_id`` is unique per batcher.

    ``resumed`` > 0 marks a sequence the engine re-admits after a step raised: the last
    ``resumed`` of ``prompt_ids`` are tokens it already generated (and delivered), and
    ``params.max_tokens`` counts only the tokens still to come. A backend may ignore it (the prompt
    and the limit are already right); one that can, continues exactly where the sequence was.
    """

    seq_id: int
    prompt_ids: Sequence[int]
    params: SamplingParams
    resumed: int

    def __init__(
        self, seq_id: int, prompt_ids: Sequence[int], params: SamplingParams, resumed: int = 0
    ) -> None:
        # One per admitted request on the loop's hot path: see PrepareRequest.__init__.
        _set_new_id(self, seq_id)
        _set_new_prompt(self, prompt_ids)
        _set_new_params(self, params)
        _set_new_resumed(self, resumed)


_set_prepare_prompt, _set_prepare_params = slot_setters(PrepareRequest, "prompt", "params")
_set_new_id, _set_new_prompt, _set_new_params, _set_new_resumed = slot_setters(
    NewSequence, "seq_id", "prompt_ids", "params", "resumed"
)


@dataclass(slots=True)
class SeqOutput:
    """What one sequence produced in one step: new token ids, the new text they complete, and the
    finish reason if this is its last output. ``text`` may be empty while the backend holds back an
    incomplete UTF-8 character or a possible stop-string prefix. ``logprobs``: one entry per token
    id when the sequence's ``params.logprobs`` is set, else empty."""

    seq_id: int
    token_ids: Sequence[int]
    text: str
    finish_reason: FinishReason | None = None
    logprobs: Sequence[Logprobs] = ()


@dataclass(slots=True)
class StepResult:
    """The result of one :meth:`GenerationBackend.step`.

    ``computed_tokens`` counts the token positions the model computed (padding included) and
    ``padding_tokens`` how many of them were padding: the padding-waste metric. Backends that do
    not pad leave both 0. ``cached_tokens``: prompt tokens served from a prefix cache, not computed.
    ``interrupted``: the step stopped early after an ``interrupt()`` (see
    :class:`GenerationBackend`): it produced no tokens, its sequences still run, and the next step
    computes their tokens (``failed`` and the drops still count).
    """

    outputs: list[SeqOutput]
    failed: dict[int, BaseException] = field(default_factory=dict)
    computed_tokens: int = 0
    padding_tokens: int = 0
    cached_tokens: int = 0
    interrupted: bool = False


@runtime_checkable
class GenerationBackend(Protocol):
    """A model that generates token by token for a changing batch of sequences.

    It keeps its own per-sequence state (the KV cache) and is driven by its engine one *iteration*
    at a time. Which thread calls what, and when:

    ``start()``
        once, on the engine's dedicated device thread, before anything else (load weights, warm up).
    ``prepare(requests)``
        on the engine's host thread (not the device thread, never the event loop), for a batch of
        newly admitted requests at once: tokenize, apply the chat template, check the context
        limit. Returns one :class:`PreparedPrompt` or one :class:`~batcher.InvalidRequest` per
        request, in order. It runs while the device computes, so tokenization never delays a step.
    ``step(admit, drop)``
        on the device thread, once per iteration: free the state of the ``drop`` sequences
        (cancelled or expired; ids the backend does not know are ignored), prefill the ``admit``
        sequences and merge them into the running batch, then decode one token for every running
        sequence. Returns a :class:`StepResult` with a :class:`SeqOutput` for every sequence that
        produced something. A sequence the backend finishes (EOS, stop string, ``max_tokens``) is
        freed by the backend itself and reported once with its ``finish_reason``. A sequence the
        backend can blame for an error goes in ``failed`` (and is freed). An exception raised from
        ``step`` means the backend may have lost every running sequence (it may reset its batch):
        the engine drops all their ids at the next call and re-admits them under fresh ids, as
        :class:`NewSequence` with ``resumed`` set, in halves until the one to blame fails alone; a
        ``MemoryError`` or CUDA ``OutOfMemoryError`` halves the batch and the token budget instead
        (docs/architecture.md, "Faults split").
    ``close()``
        once, on the device thread, after the last step: free everything.
    ``interrupt()`` (optional)
        from the event loop, while a step that admits nothing runs, when a newcomer waits to join:
        the backend may stop that step early (its first token comes a step sooner) and return a
        ``StepResult`` with ``interrupted=True`` and no outputs, its running sequences untouched.
        It decides whether stopping pays (``HFBackend``: by how far the step got, and how many rows
        it runs) and may ignore the call; it must never stop a step that admits sequences.
    """

    #: The model's name: the ``model`` label of every metric, and the name the server reports.
    model_name: str

    def start(self) -> None:
        """Device thread, once: load and warm up."""

    def prepare(self, requests: Sequence[PrepareRequest]) -> list[PreparedPrompt | InvalidRequest]:
        """Host thread: tokenize and validate a batch of requests."""
        ...

    def step(self, admit: Sequence[NewSequence], drop: Sequence[int]) -> StepResult:
        """Device thread: drop, admit (prefill), then decode one token for every running sequence."""
        ...

    def close(self) -> None:
        """Device thread, once, after the last step: free all state."""


def backend_kind(backends: Sequence[object]) -> Literal["generation", "one-shot"]:
    """Which kind all of ``backends`` are: generation backends (they have ``step``) or batch
    functions (callables). Raises :class:`InvalidRequest` for none, a mix, or anything else."""
    if not backends:
        raise InvalidRequest("Batcher needs at least one backend", field="backend")
    generative = [hasattr(b, "step") for b in backends]
    if all(generative):
        return "generation"
    if any(generative):
        raise InvalidRequest(
            "mix of generation backends and batch functions: use one kind per Batcher", field="backend"
        )
    if not all(callable(b) for b in backends):
        raise InvalidRequest(
            "backend must be a GenerationBackend (with start/prepare/step/close) or a callable list -> list",
            field="backend",
        )
    return "one-shot"
