"""The stream a caller iterates: ``async for chunk in batcher.stream(...)``.

Admission happens on entering ``async with`` (which also waits for tokenization, so admission
errors arrive before the first token is awaited) or on the first iteration. Iteration is a real
async generator, so a consumer that ``break``s, is cancelled, or closes the stream runs its
``finally`` and cancels the request; ``async with`` makes that deterministic. Nothing is cleaned up
in ``__del__``: an abandoned stream is closed by the event loop's async-generator finalizer.
:func:`completion` (what ``Batcher.generate`` returns) drains a stream: there is one consuming loop.
"""

from __future__ import annotations

from collections.abc import AsyncGenerator, AsyncIterator, Callable
from types import TracebackType

from ._errors import BatcherError
from ._request import GenRequest
from ._types import Chunk, Completion, Logprobs, Outcome

__all__ = ["TokenStream", "completion"]


class TokenStream(AsyncIterator[Chunk]):
    """The chunks of one generation request. Use as ``async with batcher.stream(...) as s:``."""

    __slots__ = ("_admit", "_agen", "_req")

    def __init__(self, admit: Callable[[], GenRequest]) -> None:
        self._admit = admit
        self._req: GenRequest | None = None
        self._agen: AsyncGenerator[Chunk, None] | None = None

    async def __aenter__(self) -> TokenStream:
        req = self._request()
        try:
            await req.wait_prepared()
        except BaseException:
            req.cancel()
            raise
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.aclose()

    def __aiter__(self) -> AsyncGenerator[Chunk, None]:
        if self._agen is None:
            self._agen = self._iterate()
        return self._agen

    async def __anext__(self) -> Chunk:
        return await self.__aiter__().__anext__()

    async def aclose(self) -> None:
        """Stop the stream; a request still running is cancelled and dropped at the next step."""
        if self._agen is not None:
            await self._agen.aclose()
        if self._req is not None:
            self._req.cancel()

    @property
    def outcome(self) -> Outcome | None:
        """How the request ended (``"finished"``, ``"cancelled"``...), or None while it runs or
        if it was never admitted."""
        return None if self._req is None else self._req.outcome

    @property
    def prompt_tokens(self) -> int:
        """The prompt's length in tokens, once admitted (after ``async with`` entered)."""
        return 0 if self._req is None else len(self._req.prompt_ids)

    def _request(self) -> GenRequest:
        if self._req is None:
            self._req = self._admit()
        return self._req

    async def _iterate(self) -> AsyncGenerator[Chunk, None]:
        req = self._request()
        try:
            while True:
                chunk = req.take_chunk()  # everything pending, merged; raises the request's error
                if chunk is not None:
                    yield chunk
                    if chunk.finish_reason is not None:
                        return  # the final chunk
                elif req.done:
                    return
                else:
                    await req.wait()
        finally:
            req.cancel()  # no-op once it ended


async def completion(stream: TokenStream) -> Completion:
    """Drain ``stream`` into one :class:`Completion` (closing it if draining stops early)."""
    texts: list[str] = []
    ids: list[int] = []
    logprobs: list[Logprobs] = []
    last: Chunk | None = None
    try:
        async for last in stream:
            texts.append(last.text)
            ids.extend(last.token_ids)
            logprobs.extend(last.logprobs)
    except BaseException:
        await stream.aclose()
        raise
    if last is None or last.finish_reason is None or last.usage is None:
        raise BatcherError("the request ended without a finish reason")  # unreachable by design
    return Completion("".join(texts), tuple(ids), last.finish_reason, last.usage, tuple(logprobs))
