"""Test doubles that ship: :class:`FakeBackend`, a deterministic, timed generation backend.

Use it to test code built on a :class:`~batcher.Batcher` without a model: its tokens are a pure
function of the prompt (:meth:`FakeBackend.expected_tokens`), its step time grows with the batch
like a real model's, and markers in a prompt inject rejections, failures and early stops.
"""

from ._fake import FakeBackend

__all__ = ["FakeBackend"]
