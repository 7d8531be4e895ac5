"""Structured output: next-token masks from a grammar (JSON mode, a JSON schema, a tool call).

The grammar engine is llguidance (why, with the measurements: ``docs/structured-output.md``).
Pieces, in the order a request meets them:

* :class:`~batcher._response_format.ResponseFormat` (torch-free, in the core): what the output
  must be, as plain data; ``ResponseFormat.tool_call`` makes one from function tools.
* :class:`GrammarCompiler`: the model's tokenizer as llguidance sees it (built once, ~0.4 s), and
  a cache of compiled grammars by format; :meth:`~GrammarCompiler.matcher` gives a sequence its
  own :class:`Matcher` (a copy of the cached one, a few microseconds). A schema that does not
  compile is an :class:`~batcher.InvalidRequest` naming ``response_format``.
* :class:`Matcher`: one sequence's place in its grammar: advanced by each sampled token; says when
  the output is complete (``accepting``: EOS is allowed; ``finished``: nothing but EOS is) or when
  it is stuck (``error``).
* :class:`TokenMasks`: the batch's masks: every constrained row's allowed-token bitmask filled into
  one preallocated tensor, then applied to the ``[rows, vocab]`` logits in one ``masked_fill_``.
  Rows without a grammar are untouched, and a batch without any costs one Python loop over its
  rows and nothing on the device.

Threads: everything runs on the device thread, except
:meth:`GrammarCompiler.check` (the host thread of ``prepare``, so a bad schema is refused before the
request is queued); the compiler's cache takes a lock. llguidance releases the GIL while it compiles
a grammar and while it computes a mask.
"""

from __future__ import annotations

import sys
import threading
from collections import OrderedDict
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from batcher import InvalidRequest
from batcher.backend import ResponseFormat

if TYPE_CHECKING:
    import llguidance

__all__ = ["GrammarCompiler", "Matcher", "TokenMasks", "banned_on_device", "banned_on_host"]

#: JSON is generated with ``json.dumps``'s separators and no other whitespace. With free
#: whitespace SmolLM2 pretty-prints and wanders: 12 of the real-model test's 20 prompts finished
#: within 80 tokens, against all 20 like this (``docs/structured-output.md``).
_JSON_OPTIONS: dict[str, Any] = {
    "whitespace_flexible": False,
    "item_separator": ", ",
    "key_separator": ": ",
}
_CACHE_SIZE = 256  # compiled grammars kept (a pristine matcher each: a few kB to a few MB)
_INSTALL = "install it with `pip install 'llm-batcher[hf]'` (or `pip install llguidance`)"


class Matcher:
    """One sequence's state in its grammar. Device thread only."""

    __slots__ = ("_m",)

    def __init__(self, matcher: llguidance.LLMatcher) -> None:
        self._m = matcher

    def advance(self, token: int) -> None:
        """Record the sampled ``token``; one the mask did not allow leaves the matcher in ``error``."""
        self._m.consume_token(token)

    @property
    def accepting(self) -> bool:
        """The output so far is complete: EOS is allowed (more may be too, e.g. more digits)."""
        return bool(self._m.is_accepting())

    @property
    def finished(self) -> bool:
        """The output is complete and nothing but EOS may follow: end the sequence now."""
        return bool(self._m.is_stopped()) and not self._m.is_error()

    @property
    def error(self) -> str:
        """Why the grammar cannot go on ('' while it can): a token outside the mask, a limit."""
        return str(self._m.get_error()) if self._m.is_error() else ""

    def fill(self, bitmask: torch.Tensor) -> None:
        """Write the allowed next tokens into ``bitmask`` (a contiguous int32 CPU row, one bit per
        token). llguidance releases the GIL while it computes."""
        self._m.unsafe_compute_mask_ptr(bitmask.data_ptr(), bitmask.numel() * 4)


class GrammarCompiler:
    """Compiles :class:`ResponseFormat` s for one tokenizer and keeps the last ``_CACHE_SIZE``.

    ``tokenizer``: a fast Hugging Face tokenizer; ``vocab``: the width of the model's logits (it
    may exceed the tokenizer's; the extra ids are never allowed); ``eos``: the ids that end a
    sequence (allowed once the output is complete).
    """

    def __init__(self, tokenizer: Any, *, vocab: int, eos: Sequence[int]) -> None:
        llg = _llguidance()
        backend = getattr(tokenizer, "backend_tokenizer", None)
        if backend is None:
            raise InvalidRequest(
                "structured output needs a fast (Rust) tokenizer; this model's is a Python one",
                field="response_format",
            )
        spec = _tokenizer_json(backend)
        self.vocab = vocab
        self._tokenizer = llg.LLTokenizer(spec, n_vocab=vocab, eos_token=sorted(eos))
        self._cache: OrderedDict[ResponseFormat, llguidance.LLMatcher] = OrderedDict()
        self._lock = threading.Lock()

    def check(self, fmt: ResponseFormat) -> None:
        """Compile ``fmt`` now (host thread), so a schema llguidance refuses is an
        :class:`~batcher.InvalidRequest` before the request is queued."""
        self._pristine(fmt)

    def matcher(self, fmt: ResponseFormat) -> Matcher:
        """A new sequence's matcher, at the start of ``fmt``'s grammar."""
        return Matcher(self._pristine(fmt).deep_copy())

    def _pristine(self, fmt: ResponseFormat) -> llguidance.LLMatcher:
        with self._lock:
            cached = self._cache.get(fmt)
            if cached is not None:
                self._cache.move_to_end(fmt)
                return cached
        compiled = self._compile(fmt)  # outside the lock: a large schema takes a while
        with self._lock:
            self._cache[fmt] = compiled
            while len(self._cache) > _CACHE_SIZE:
                self._cache.popitem(last=False)
        return compiled

    def _compile(self, fmt: ResponseFormat) -> llguidance.LLMatcher:
        llg = _llguidance()
        schema: Any = {"type": "object"} if fmt.type == "json_object" else fmt.schema
        try:
            grammar = llg.LLMatcher.grammar_from_json_schema(schema, overrides=_JSON_OPTIONS)
        except ValueError as exc:
            raise InvalidRequest(f"response_format schema: {exc}", field="response_format") from exc
        matcher: llguidance.LLMatcher = llg.LLMatcher(self._tokenizer, grammar, log_level=0)
        if matcher.is_error():
            raise InvalidRequest(
                f"response_format schema cannot be used for constrained decoding: "
                f"{matcher.get_error()}: fix the schema, or drop the unsupported keyword",
                field="response_format",
            )
        return matcher


class TokenMasks:
    """Applies the constrained rows' next-token masks to a step's logits (device thread).

    The bitmask (one int32 word per 32 tokens, a row per constrained sequence) is preallocated on
    the host (pinned on CUDA, so its copy to the device does not block) and grows only when more
    rows are constrained than ever before. It is unpacked to a ``[rows, vocab]`` boolean (on the
    CPU by numpy's ``unpackbits``; on a GPU, after a copy of the packed words, by one broadcast
    ``&`` against a byte's 8 bit values) and the zero bits are banned with one ``masked_fill_``.
    """

    def __init__(self, vocab: int, device: torch.device, rows: int = 32) -> None:
        self.vocab, self.device = vocab, device
        self.words = (vocab + 31) // 32
        self._bitmask = self._allocate(rows)
        self._bits = torch.tensor([1 << i for i in range(8)], dtype=torch.uint8, device=device)

    def apply(self, logits: torch.Tensor, matchers: Sequence[Matcher | None]) -> torch.Tensor:
        """``logits`` ([rows, vocab], one per ``matchers`` entry) with every disallowed token of a
        constrained row (a matcher that is not ``None``) set to -inf, in place."""
        rows = [i for i, m in enumerate(matchers) if m is not None]
        if not rows:
            return logits
        banned = self._banned([m for m in matchers if m is not None])
        if len(rows) == len(matchers):
            return logits.masked_fill_(banned, float("-inf"))
        idx = torch.tensor(rows, device=logits.device)
        logits[idx] = logits[idx].masked_fill_(banned, float("-inf"))
        return logits

    def _banned(self, matchers: Sequence[Matcher]) -> torch.Tensor:
        """[len(matchers), vocab] bool, True where the token is not allowed."""
        if len(matchers) > self._bitmask.shape[0]:
            self._bitmask = self._allocate(max(len(matchers), 2 * self._bitmask.shape[0]))
        bitmask = self._bitmask[: len(matchers)]
        for m, row in zip(matchers, bitmask, strict=True):
            m.fill(row)
        if self.device.type == "cpu":  # numpy's unpackbits: 3-4x faster than torch's broadcast
            return banned_on_host(bitmask, self.vocab)
        words = bitmask.to(self.device, non_blocking=True)  # pinned: the copy does not block
        return banned_on_device(words, self._bits, self.vocab)

    def _allocate(self, rows: int) -> torch.Tensor:
        pin = self.device.type == "cuda"
        return torch.zeros(rows, self.words, dtype=torch.int32, pin_memory=pin)


# Both unpack little-endian words: byte j of a word holds tokens 8j..8j+7 of its 32, bit i 8j+i.
def banned_on_host(bitmask: torch.Tensor, vocab: int) -> torch.Tensor:
    """[rows, vocab] bool, True where ``bitmask`` (CPU int32 words) has a zero bit."""
    bits = np.unpackbits(bitmask.numpy().view(np.uint8), axis=-1, bitorder="little")
    return torch.from_numpy(~bits[:, :vocab].view(np.bool_))


def banned_on_device(words: torch.Tensor, byte_bits: torch.Tensor, vocab: int) -> torch.Tensor:
    """The same, with torch ops on ``words``' device (``byte_bits``: uint8 1, 2, 4 ... 128)."""
    allowed = words.view(torch.uint8).unsqueeze(-1) & byte_bits
    return (allowed == 0).view(words.shape[0], -1)[:, :vocab]


def _tokenizer_json(backend: Any) -> str:
    """The Rust tokenizer's JSON, without padding or truncation (which would change token ids)."""
    from copy import copy

    plain = copy(backend)
    plain.no_padding()
    plain.no_truncation()
    return str(plain.to_str())


def _llguidance() -> Any:
    try:
        import llguidance
    except ImportError as exc:
        raise InvalidRequest(
            f"structured output (response_format, tools) needs llguidance: {_INSTALL}",
            field="response_format",
        ) from exc
    return llguidance


if sys.byteorder != "little":  # pragma: no cover - every platform torch ships for is little-endian
    raise ImportError("batcher.adapters.hf._grammar unpacks bitmasks as little-endian bytes")
