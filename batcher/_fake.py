"""A deterministic fake generation backend that ships: for users' tests, ours, and benchmarks.

Its step takes ``step_time_s + step_time_per_seq_s * batch_size + step_time_per_token_s *
prefilled tokens`` seconds (slept on the device thread, as a real model's step would block it), so
batching behaves as it does on a real model. A prefix cache of ``prefix_cache_tokens`` (blocks of
8 tokens keyed by a hash chain, LRU-evicted, as the HF backend's) serves the prompts' known
prefixes: those tokens are not prefilled, and ``prepare`` reports them as
``PreparedPrompt.cached_tokens``. It tokenizes by whitespace and generates tokens that are a pure
function of the prompt, the position and the seed (:func:`FakeBackend.expected_tokens`), so a test
can check that every token reached the right request. Failures can be injected on demand.
:meth:`FakeBackend.interrupt` ends the sleep of a step that admits nothing, as a real backend
stops a decode step early for a newcomer.
"""

from __future__ import annotations

import math
import threading
import time
import zlib
from collections.abc import Sequence
from dataclasses import dataclass

from ._backend import NewSequence, PreparedPrompt, PrepareRequest, SeqOutput, StepResult
from ._errors import InvalidRequest, PromptTooLong
from ._prefix_index import PrefixCache, PrefixStats
from ._text import StopMatcher
from ._types import Logprobs, Prompt, SamplingParams, TokenIds, TokenLogprob

__all__ = ["FakeBackend"]


@dataclass(slots=True)
class _Seq:
    base: int
    params: SamplingParams
    produced: int
    limit: int  # max_tokens, counted from the first token (a resumed sequence has some already)
    stop: StopMatcher
    eos_at: int | None
    poison: bool


class FakeBackend:
    """A fake :class:`~batcher.GenerationBackend`.

    Markers in a prompt inject behaviour: the word ``REJECT`` makes ``prepare`` refuse it, ``FAIL``
    makes the backend blame that sequence when it is admitted, ``POISONOUS`` makes every step that
    holds it raise, and ``eos:N`` ends it with ``finish_reason="stop"`` after N tokens.
    :meth:`fail_next_steps` makes whole steps raise; ``oom_above`` makes every step of more
    sequences than that raise ``MemoryError``. A step that raises forgets every sequence, as a
    backend that resets its batch does; a resumed sequence (``NewSequence.resumed``) continues
    exactly where it was. ``prefix_cache_tokens=0`` turns the prefix cache off.
    """

    def __init__(
        self,
        *,
        model_name: str = "fake",
        step_time_s: float = 0.0,
        step_time_per_seq_s: float = 0.0,
        max_context: int = 4096,
        max_batch_tokens: int | None = None,
        vocab_size: int = 50_000,
        step_time_per_token_s: float = 0.0,
        prefix_cache_tokens: int = 4096,
    ) -> None:
        self.model_name = model_name
        self.step_time_s = step_time_s
        self.step_time_per_seq_s = step_time_per_seq_s
        self.step_time_per_token_s = step_time_per_token_s
        self.prefix_cache_tokens = max(0, prefix_cache_tokens) // 8 * 8
        self._prefix = PrefixCache(self.prefix_cache_tokens // 8) if self.prefix_cache_tokens else None
        self.max_context = max_context
        self.max_batch_tokens = max_batch_tokens
        self.vocab_size = vocab_size
        self._seqs: dict[int, _Seq] = {}
        self._lock = threading.Lock()
        self._failing_steps = 0
        #: Steps of more sequences than this raise ``MemoryError`` (None: never).
        self.oom_above: int | None = None
        #: Thread idents each verb ran on (tests check none is the event loop's).
        self.threads: dict[str, set[int]] = {"start": set(), "prepare": set(), "step": set(), "close": set()}
        #: Batch size of every step, in order (for tests and benchmarks).
        self.batch_sizes: list[int] = []
        #: Prompt tokens prefilled (not served from the prefix cache) by every step, in order.
        self.prefill_sizes: list[int] = []
        #: Each ``interrupt()`` call: how many sequences the step running then admitted (None: no
        #: step was running). The engine should only interrupt steps that admit nothing.
        self.interrupt_calls: list[int | None] = []
        #: Indices (into ``batch_sizes``) of the steps an interrupt stopped.
        self.interrupted_steps: list[int] = []
        self._interrupt = threading.Event()
        self._running_admits: int | None = None
        self.started = False
        self.closed = False
        self._fail_id = self.word_id("FAIL")
        self._poison_id = self.word_id("POISONOUS")
        self._poisoned = False  # a POISONOUS sequence was admitted (it may still run)
        self._reject_id = self.word_id("REJECT")
        self._eos_marks = {self.word_id(f"eos:{n}"): n for n in range(1, 257)}

    # -- the four verbs ---------------------------------------------------------------------
    def start(self) -> None:
        self.threads["start"].add(threading.get_ident())
        self.started = True

    def prepare(self, requests: Sequence[PrepareRequest]) -> list[PreparedPrompt | InvalidRequest]:
        self.threads["prepare"].add(threading.get_ident())
        return [self._prepare_one(r.prompt, r.params) for r in requests]

    def interrupt(self) -> None:
        """Any thread: stop the running step's sleep if it admits nothing (it then produces no
        tokens); ignored otherwise. Cleared at each step's end, as ``HFBackend.interrupt``."""
        with self._lock:
            self.interrupt_calls.append(self._running_admits)
        self._interrupt.set()

    def step(self, admit: Sequence[NewSequence], drop: Sequence[int]) -> StepResult:
        self.threads["step"].add(threading.get_ident())
        with self._lock:
            self._running_admits = len(admit)
        try:
            return self._step(admit, drop)
        finally:
            with self._lock:
                self._running_admits = None
            self._interrupt.clear()

    def _step(self, admit: Sequence[NewSequence], drop: Sequence[int]) -> StepResult:
        with self._lock:
            if self._failing_steps:
                self._failing_steps -= 1
                self._seqs.clear()
                raise RuntimeError("injected step failure (FakeBackend.fail_next_steps)")
        for seq_id in drop:
            self._seqs.pop(seq_id, None)
        failed: dict[int, BaseException] = {}
        prefilled = cached = 0
        for new in admit:
            if self._fail_id in new.prompt_ids:
                failed[new.seq_id] = ValueError(f"injected failure for sequence {new.seq_id} (FAIL marker)")
                continue
            seq = self._seqs[new.seq_id] = self._new_seq(new)
            self._poisoned |= seq.poison
            hit = self._cache_prompt(new.prompt_ids)
            cached, prefilled = cached + hit, prefilled + len(new.prompt_ids) - hit
        batch = len(self._seqs)
        self.batch_sizes.append(batch)
        self.prefill_sizes.append(prefilled)
        self._raise_if_broken(batch)
        delay = self.step_time_s + self.step_time_per_seq_s * batch + self.step_time_per_token_s * prefilled
        if delay > 0:
            if admit:
                time.sleep(delay)
            elif self._interrupt.wait(delay):  # a newcomer stopped this step
                self.interrupted_steps.append(len(self.batch_sizes) - 1)
                return StepResult([], failed, interrupted=True)
        outputs = [self._decode(seq_id, s) for seq_id, s in self._seqs.items()]
        for out in outputs:
            if out.finish_reason is not None:
                del self._seqs[out.seq_id]
        return StepResult(outputs, failed, computed_tokens=batch, padding_tokens=0, cached_tokens=cached)

    def _cache_prompt(self, ids: Sequence[int]) -> int:
        """Look ``ids`` up in the prefix cache (counted) and index its full blocks: tokens reused."""
        if self._prefix is None:
            return 0
        hit = self._prefix.match(ids)[1]
        self._prefix.insert(ids)
        return hit

    def close(self) -> None:
        self.threads["close"].add(threading.get_ident())
        self._seqs.clear()
        self.closed = True

    # -- test helpers -----------------------------------------------------------------------
    @property
    def prefix_stats(self) -> PrefixStats:
        """The prefix cache's running totals (all zero when it is off)."""
        return self._prefix.stats if self._prefix is not None else PrefixStats()

    @property
    def cached_tokens(self) -> int:
        """Tokens the prefix cache holds now."""
        return self._prefix.cached_tokens if self._prefix is not None else 0

    @property
    def live_sequences(self) -> int:
        """Sequences whose state the backend still holds (0 after every request ended)."""
        return len(self._seqs)

    def fail_next_steps(self, n: int = 1) -> None:
        """Make the next ``n`` calls of :meth:`step` raise (thread-safe)."""
        with self._lock:
            self._failing_steps += n

    def word_id(self, word: str) -> int:
        return zlib.crc32(word.encode()) % self.vocab_size

    def tokenize(self, prompt: Prompt) -> list[int]:
        """The fake tokenizer: one token per whitespace-separated word (chat: ``role: content``);
        token ids as they are."""
        if isinstance(prompt, TokenIds):
            return list(prompt.ids)
        text = (
            prompt if isinstance(prompt, str) else "\n".join(f"{m['role']}: {m['content']}" for m in prompt)
        )
        return [self.word_id(w) for w in text.split()] or [0]

    def expected_tokens(self, prompt: Prompt, params: SamplingParams) -> list[int]:
        """The token ids this backend generates for ``prompt`` (before stop strings apply)."""
        ids = self.tokenize(prompt)
        eos = self._eos_at(ids)
        n = params.max_tokens if eos is None else min(eos, params.max_tokens)
        base = self._base(ids, params)
        return [(base + 7919 * (k + 1)) % self.vocab_size for k in range(n)]

    @staticmethod
    def token_text(token_id: int) -> str:
        return f" t{token_id}"

    # -- internals --------------------------------------------------------------------------
    def _new_seq(self, new: NewSequence) -> _Seq:
        prompt = new.prompt_ids[: len(new.prompt_ids) - new.resumed]
        return _Seq(
            self._base(prompt, new.params),
            new.params,
            new.resumed,
            new.resumed + new.params.max_tokens,
            StopMatcher(new.params.stop),
            self._eos_at(prompt),
            self._poison_id in prompt,
        )

    def _raise_if_broken(self, batch: int) -> None:
        """A poisoned sequence, or more than ``oom_above`` of them, makes the step raise (and
        forget every sequence)."""
        if self._poisoned and any(s.poison for s in self._seqs.values()):
            self._seqs.clear()
            raise RuntimeError("injected step failure (POISONOUS marker)")
        if self.oom_above is not None and batch > self.oom_above:
            self._seqs.clear()
            raise MemoryError(f"injected out of memory: {batch} sequences > oom_above={self.oom_above}")

    def _prepare_one(self, prompt: Prompt, params: SamplingParams) -> PreparedPrompt | InvalidRequest:
        if params.response_format is not None:
            return InvalidRequest(
                "FakeBackend cannot constrain its output: response_format needs the HF backend",
                field="response_format",
            )
        ids = self.tokenize(prompt)
        if self._reject_id in ids:
            return InvalidRequest("prompt contains the REJECT marker (FakeBackend)", field="prompt")
        total = len(ids) + params.max_tokens
        if total > self.max_context:
            return PromptTooLong(
                f"prompt ({len(ids)} tokens) + max_tokens ({params.max_tokens}) = {total} exceeds "
                f"the context window of {self.max_context} tokens: shorten the prompt or lower max_tokens",
                limit=self.max_context,
                requested=total,
            )
        return PreparedPrompt(ids, self._prefix.peek(ids) if self._prefix is not None else 0)

    def _eos_at(self, ids: Sequence[int]) -> int | None:
        return next((self._eos_marks[i] for i in ids if i in self._eos_marks), None)

    @staticmethod
    def _base(prompt_ids: Sequence[int], params: SamplingParams) -> int:
        """Token k of a sequence is ``(base + 7919 * (k + 1)) % vocab_size``."""
        base = zlib.crc32(bytes(str(tuple(prompt_ids[:64])), "ascii"))
        salt = 0 if params.greedy or params.seed is None else params.seed * 2654435761
        return base + salt

    def _decode(self, seq_id: int, s: _Seq) -> SeqOutput:
        s.produced += 1
        tok = (s.base + 7919 * s.produced) % self.vocab_size
        text, stopped = s.stop.feed(self.token_text(tok))
        out = SeqOutput(seq_id, (tok,), text)
        if s.params.logprobs is not None:
            out.logprobs = (self.logprobs(tok, s.params.logprobs),)
        if stopped:
            out.finish_reason = "stop"
        elif s.eos_at is not None and s.produced >= s.eos_at:
            out.text, out.finish_reason = text + s.stop.flush(), "stop"
        elif s.produced >= s.limit:
            out.text, out.finish_reason = text + s.stop.flush(), "length"
        return out

    def logprobs(self, token_id: int, k: int) -> Logprobs:
        """The fake's distribution at every position: the generated token has probability 1/2,
        the next ids 1/4, 1/8... (so ``k`` alternatives are the token itself and ``k - 1`` more)."""

        def entry(rank: int) -> TokenLogprob:
            t = (token_id + rank) % self.vocab_size
            return TokenLogprob(t, -math.log(2) * (rank + 1), self.token_text(t).encode())

        return Logprobs(entry(0), tuple(entry(r) for r in range(k)))
