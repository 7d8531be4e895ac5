"""For backend authors: the protocol a model backend implements, and the types it exchanges.

:class:`GenerationBackend` is four verbs (``start``, ``prepare``, ``step``, ``close``; its docstring
says which thread calls each, and when); a :data:`BatchFunction` is any callable
``list[In] -> list[Out]``. :class:`StopMatcher` holds back text that may become a stop
string. :class:`PrefixCache` is a prefix index over hashed token blocks a backend can keep its
prefix cache's slots by. :class:`ResponseFormat` is what ``SamplingParams.response_format`` holds (callers of
``Batcher.stream`` pass one as ``response_format=``). Errors a backend returns or raises are the
public ones in :mod:`batcher`.
"""

from ._backend import (
    BatchFunction,
    GenerationBackend,
    NewSequence,
    PreparedPrompt,
    PrepareRequest,
    SeqOutput,
    StepResult,
)
from ._prefix_index import PrefixCache, PrefixStats
from ._response_format import ResponseFormat
from ._text import StopMatcher
from ._types import FinishReason, Logprobs, SamplingParams, TokenLogprob

__all__ = [
    "BatchFunction",
    "FinishReason",
    "GenerationBackend",
    "Logprobs",
    "NewSequence",
    "PrefixCache",
    "PrefixStats",
    "PrepareRequest",
    "PreparedPrompt",
    "ResponseFormat",
    "SamplingParams",
    "SeqOutput",
    "StepResult",
    "StopMatcher",
    "TokenLogprob",
]
