"""llm-batcher: asyncio batching middleware for LLM request streams.

Public: this module (what users call and catch), :mod:`batcher.backend` (what a model backend
implements) and :mod:`batcher.testing` (test doubles). docs/architecture.md follows one streamed
request through the private modules.

Layout (a module imports only modules below it; ``batcher`` never imports torch or
``batcher.adapters``):
    _batcher      Batcher, the facade: picks the service, owns the engines' lifetime, reports stats
    _generation   stream() and generate(): validate, admit, hand the request to an engine
    _oneshot      infer(): OneShotBatcher and its engine, for batch functions list[In] -> list[Out]
    _stream       TokenStream: the chunks of one request (generate() drains one)
    _continuous   GenerationEngine: one device's prepare task (host thread) and step loop
    _pipeline     one engine's requests by stage: admit → prepare → queue → run → end
    _faults       a failed step split in halves until the request to blame fails alone; OOM
    _request      GenRequest: one request's stage, deadline and bounded mailbox
    _admission    the gate both kinds of request pass: open, max_queue, retry-after, least loaded
    _options      validation of a generation call's prompt and options
    _engine       what every engine has: device thread, loop task, wake-ups, idle, statistics
    _scheduler    the pure scheduling policy: tenants' fair shares, priorities with aging, slots, tokens
    _cost         the step-cost model learned online: predicted TTFT, drain rate, batch window
    _metrics      Prometheus export at scrape time, from Batcher.engine_stats()
    _stats        cheap counters and histograms; the BatcherStats snapshot
    _worker       the dedicated thread a device (or the prepare stage) runs on
    _wakeup       how one loop task waits for another: never a poll
    _fake         FakeBackend, a deterministic timed backend for tests and benchmarks
    _backend      the backend protocol (start / prepare / step / close) and its value types
    _prefix_index  PrefixCache: an LRU prefix index over hashed token blocks (HF and fake backends)
    _text         StopMatcher: stop strings that never leak into a stream
    _config, _types, _response_format, _errors   configuration, value types (ResponseFormat:
                  a structured output as plain data), the exception tree
"""

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
from ._stats import BatcherStats
from ._stream import TokenStream
from ._types import Chunk, Completion, GenerationOptions, Prompt, TokenIds, Usage

__all__ = [
    "BatchConfig",
    "Batcher",
    "BatcherClosed",
    "BatcherError",
    "BatcherStats",
    "Chunk",
    "Completion",
    "DeadlineExceeded",
    "GenerationOptions",
    "InvalidRequest",
    "Overloaded",
    "Prompt",
    "PromptTooLong",
    "RequestFailed",
    "TokenIds",
    "TokenStream",
    "Usage",
]
__version__ = "0.1.0"
