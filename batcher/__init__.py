"""llm-batcher: asyncio batching middleware for LLM request streams.

Layout (dependencies point down; ``batcher`` never imports torch or ``batcher.adapters``):
    _batcher    Batcher: the facade; admission, tokenization on the host thread, shutdown
    _stream     TokenStream: what ``Batcher.stream`` returns
    _engine     one engine per device: continuous batching, or one-shot batches
    _scheduler  the pure scheduling policy (slots, token budget, priorities with aging, deadlines)
    _request    one request's state, deadline and bounded mailbox
    _worker     the dedicated thread a device runs on
    _backend    the backend protocol (start / prepare / step / close) and its value types
    _fake       FakeBackend, a deterministic timed backend for tests and benchmarks
    _text       StopMatcher: stop strings that never leak into a stream
    _stats      cheap statistics; _metrics exports them to Prometheus at scrape time
    _config, _types, _errors   configuration, value types, the exception tree
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
from ._batcher import Batcher
from ._config import BatchConfig
from ._errors import (
    BatcherClosed,
    BatcherError,
    DeadlineExceeded,
    InvalidRequest,
    Overloaded,
    PromptTooLong,
    RequestFailed,
)
from ._fake import FakeBackend
from ._stats import BatcherStats
from ._stream import TokenStream
from ._text import StopMatcher
from ._types import (
    Chunk,
    Completion,
    FinishReason,
    GenerationOptions,
    Outcome,
    Prompt,
    SamplingParams,
    Usage,
)

__all__ = [
    "BatchConfig",
    "BatchFunction",
    "Batcher",
    "BatcherClosed",
    "BatcherError",
    "BatcherStats",
    "Chunk",
    "Completion",
    "DeadlineExceeded",
    "FakeBackend",
    "FinishReason",
    "GenerationBackend",
    "GenerationOptions",
    "InvalidRequest",
    "NewSequence",
    "Outcome",
    "Overloaded",
    "PrepareRequest",
    "PreparedPrompt",
    "Prompt",
    "PromptTooLong",
    "RequestFailed",
    "SamplingParams",
    "SeqOutput",
    "StepResult",
    "StopMatcher",
    "TokenStream",
    "Usage",
]
__version__ = "0.1.0"
