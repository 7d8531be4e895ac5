"""The one exception tree of llm-batcher.

Every error the batcher raises derives from :class:`BatcherError`, and every message says what the
caller can do about it::

    BatcherError
    ├── InvalidRequest        (also ValueError)    fix the request; retrying it unchanged fails again
    │   └── PromptTooLong                          shorten the prompt or lower max_tokens
    ├── Overloaded                                 retry after ``retry_after`` seconds
    ├── DeadlineExceeded      (also TimeoutError)  the request's own deadline passed; retry with more time
    ├── BatcherClosed                              the batcher is closing or closed; send elsewhere
    └── RequestFailed                              the backend failed this request; ``__cause__`` says why

Recoverable means "the same request may succeed later": ``Overloaded`` and ``DeadlineExceeded`` are,
``InvalidRequest`` is not, ``RequestFailed`` depends on its cause, and ``BatcherClosed`` is for this
batcher only. A consumer's own cancellation is not an error of ours: ``asyncio.CancelledError``
propagates unchanged.
"""

from __future__ import annotations

__all__ = [
    "BatcherClosed",
    "BatcherError",
    "DeadlineExceeded",
    "InvalidRequest",
    "Overloaded",
    "PromptTooLong",
    "RequestFailed",
]


class BatcherError(Exception):
    """Base class of every error llm-batcher raises."""


class InvalidRequest(BatcherError, ValueError):
    """The request is malformed: a field has a bad value. Not recoverable without changing it.

    ``field`` names the offending field when there is one (``"max_tokens"``, ``"prompt"``...).
    """

    def __init__(self, message: str, *, field: str | None = None) -> None:
        super().__init__(message)
        self.field = field


class PromptTooLong(InvalidRequest):
    """The prompt, or the prompt plus ``max_tokens``, does not fit the model's context or budget."""

    def __init__(self, message: str, *, limit: int, requested: int, field: str = "prompt") -> None:
        super().__init__(message, field=field)
        self.limit = limit
        self.requested = requested


class Overloaded(BatcherError):
    """The queue is full. Recoverable: retry after ``retry_after`` seconds (an estimate from the
    recent drain rate), or send the request to another replica."""

    def __init__(self, message: str, *, retry_after: float) -> None:
        super().__init__(message)
        self.retry_after = retry_after


class DeadlineExceeded(BatcherError, TimeoutError):
    """The request's deadline passed, in the queue or while generating. Tokens already streamed
    stay delivered; retry with a longer ``deadline_s`` if the work is still wanted."""


class BatcherClosed(BatcherError):
    """The batcher is not accepting or finishing work: it was never started, is draining, or closed."""


class RequestFailed(BatcherError):
    """The backend raised while serving this request; the original error is ``__cause__``.

    Other requests are not affected: the engine goes on serving.
    """


def failed(message: str, cause: BaseException) -> RequestFailed:
    """The error of a request the backend failed: ``message``, caused by ``cause``."""
    err = RequestFailed(f"{message}: {cause!r}")
    err.__cause__ = cause
    return err
