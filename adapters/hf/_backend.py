"""HFBackend: continuous batching for Hugging Face causal language models, CPU or CUDA.

One :meth:`HFBackend.step` drops cancelled rows, runs one packed forward call (the decode rows'
last tokens and the newcomers' prompts, unpadded, with a fixed number of kernels per layer:
``_attention``) over a preallocated KV slab (``_cache``), then samples, detokenizes and ends rows
(``_sampling``, ``_detok``, ``_rows``). The design, its measurements and the precision guarantees
are in ``docs/hf-backend.md``.
"""

from __future__ import annotations

import copy
import os
import threading
from collections.abc import Callable, Sequence
from typing import Any

import torch

from batcher import InvalidRequest, Prompt, PromptTooLong, TokenIds
from batcher.backend import (
    NewSequence,
    PreparedPrompt,
    PrepareRequest,
    SamplingParams,
    SeqOutput,
    StepResult,
)

from ._attention import ATTENTION, Shared, StepInterrupted, StepPlan, plan_step
from ._cache import KVSlab
from ._cpu_linear import pack_linears
from ._detok import TokenBytes
from ._grammar import GrammarCompiler, Matcher, TokenMasks
from ._graphs import DecodeGraphs
from ._load import (
    check_cache_compatible,
    default_kv_gb,
    eos_ids,
    head_dim,
    kv_bytes_per_token,
    kv_heads,
    max_context,
    resolve_dtype,
    resolve_source,
)
from ._prefix import PrefixCache, PrefixStats, chat_prefix
from ._rows import Row
from ._sampling import Penalties, sample, top_logprobs
from ._tokenize import Tokenizers, encode_capped

__all__ = ["HFBackend"]

_GIB = 1 << 30
_BLOCK = 8  # prefix cache block, tokens (``_prefix``)
#: A first token counts this many times a running row's next token when ``interrupt`` weighs
#: stopping a decode step: the wait people notice most is the one before anything appears.
_FIRST_TOKEN_WEIGHT = 4
#: Decode rows attend to a prompt prefix they share once (``_attention.Shared``) when at least this
#: many share at least this many tokens: below, the two-part attention costs more than it saves.
_SHARED_MIN_ROWS = 12
_SHARED_MIN_TOKENS = 128
# A cascade grouping (``HFBackend._group``): members, first own columns, leader, length, rest.
_Group = tuple[torch.Tensor, torch.Tensor, int, int, int]


class HFBackend:
    """Continuous batching for a transformers causal LM (design: ``docs/hf-backend.md``).

    ``model``: a local folder, a hub id (where a hub is reachable), a ``.gguf`` file, or ``None``
    for the embedded SmolLM2-135M-Instruct (converted once to a cached safetensors folder).
    ``gguf_file``: a GGUF file name inside the ``model`` folder or repository.
    ``dtype``: ``"auto"`` (float32 on CPU, bfloat16/float16 on CUDA), ``"float32"``,
    ``"bfloat16"``, ``"float16"`` or a ``torch.dtype``. ``device``: ``"cpu"``, ``"cuda"``,
    ``"cuda:1"``... ``max_batch_tokens``: the KV budget in tokens (default: derived from
    ``kv_memory_gb``, see ``docs/hf-backend.md``). ``model_name``: the metrics label (default: derived
    from the model). ``cuda_graphs``: replay decode-only steps as CUDA graphs per batch-size bucket
    (``_graphs``; CUDA only, refused elsewhere; off by default until measured on a GPU).
    ``allow_special_tokens``: parse special-token text (``<|im_start|>``...) in prompts and message
    contents as control tokens; off by default, so a user cannot forge chat turns (trusted callers
    only).

    The tokenizer and config load here (``prepare`` may run before ``start``); the weights load
    in :meth:`start`, on the device thread.

    Attributes: ``model_name``; ``max_context`` (tokens: the model's position limit, or the
    tokenizer's if smaller); ``max_batch_tokens`` (the KV budget the scheduler reserves against,
    see ``docs/hf-backend.md``); ``prefix_cache_tokens`` (the prefix cache's pool, 0 when off:
    ``prefix_cache=True`` gives it a quarter of the KV memory, an int that many tokens, ``False``
    turns it off); ``kv_bytes_per_token``; ``dtype``; ``device``; ``tokenizer``; ``model``
    (after ``start``).
    """

    def __init__(
        self,
        model: str | os.PathLike[str] | None = None,
        *,
        gguf_file: str | None = None,
        dtype: str | torch.dtype = "auto",
        device: str | torch.device = "cpu",
        max_batch_tokens: int | None = None,
        kv_memory_gb: float | None = None,
        model_name: str | None = None,
        cuda_graphs: bool = False,
        allow_special_tokens: bool = False,
        prefix_cache: bool | int = True,
    ) -> None:
        from transformers import AutoConfig, AutoTokenizer

        self.device = torch.device(device)
        if cuda_graphs and self.device.type != "cuda":
            raise InvalidRequest(
                f"cuda_graphs=True needs a CUDA device, not {self.device}: the CPU runs eager "
                "steps (graphs would save no launch cost there); leave cuda_graphs off",
                field="cuda_graphs",
            )
        self.cuda_graphs = cuda_graphs
        self.dtype = resolve_dtype(dtype, self.device)
        self._source, self._load_kw, default_name = resolve_source(model, gguf_file)
        self.model_name = model_name or default_name
        self.tokenizer = AutoTokenizer.from_pretrained(self._source, **self._load_kw)
        # Each thread tokenizes with its own copy, the device thread decodes with its own: a
        # tokenizer is not safe to share between threads (the Rust object refuses concurrent
        # borrows when settings change). No lock: prepare may run on several threads at once.
        self._decode_tokenizer = copy.deepcopy(self.tokenizer)
        self._tokenizers = Tokenizers(self.tokenizer)
        self._vocab = len(self.tokenizer)
        self.config = AutoConfig.from_pretrained(self._source, **self._load_kw)
        text = self.config.get_text_config()
        check_cache_compatible(text)
        self.max_context = max_context(text, self.tokenizer)
        self.kv_bytes_per_token = kv_bytes_per_token(text, self.dtype)
        self.kv_memory_bytes = int((kv_memory_gb or default_kv_gb(self.device)) * _GIB)
        self.prefix_cache_tokens = prefix_cache_tokens(
            prefix_cache, self.kv_memory_bytes // (4 * self.kv_bytes_per_token)
        )
        pool_bytes = self.prefix_cache_tokens * self.kv_bytes_per_token  # inside the KV memory
        self.max_batch_tokens = max_batch_tokens or max(
            1, (self.kv_memory_bytes - pool_bytes) // (2 * self.kv_bytes_per_token)
        )
        self._cache: PrefixCache | None = None
        if self.prefix_cache_tokens:
            self._cache = PrefixCache(self.prefix_cache_tokens // _BLOCK, _BLOCK)
        self._tokens: dict[int, list[int]] = {}  # each live sequence's prompt + generated ids
        self._unstored: set[int] = set()  # newcomers whose prompt blocks go to the cache next step
        self._eos = eos_ids(self.config, self.tokenizer, self._source, self._load_kw)
        self._special = frozenset(self.tokenizer.all_special_ids)
        self.allow_special_tokens = allow_special_tokens
        decoder = getattr(self.tokenizer, "added_tokens_decoder", {})
        self._special_texts = tuple(
            {*self.tokenizer.all_special_tokens, *(t.content for t in decoder.values() if t.special)}
        )
        self._pad = self._eos_first()
        self.model: Any = None
        self._slab: KVSlab | None = None
        self._graphs: DecodeGraphs | None = None
        self._rows: list[Row] = []
        self._asking = 0  # live rows that asked for logprobs: none, and a step computes none
        self._constrained = 0  # live rows with a response_format: none, and a step masks none
        self._grammar: GrammarCompiler | None = None  # at the first response_format (``_grammars``)
        self._grammar_lock = threading.Lock()
        self._masks: TokenMasks | None = None  # after ``start``
        self._token_bytes = TokenBytes(self._decode_tokenizer)  # device thread only
        self._penalties: Penalties | None = None  # after ``start`` (it needs the vocabulary size)
        self._no_mask = torch.ones(1, 1, 1, 1, dtype=torch.bool, device=self.device)
        self.packed_linears = 0
        self._generator = torch.Generator()  # unseeded sampling rows draw from it
        self._generator.seed()  # from fresh entropy
        self.attention_calls = 0  # in the last step's forward call (the warm-up checks it)
        self._interrupt = threading.Event()  # set by ``interrupt``, cleared at each step's end
        self.shared_prefix_steps = 0  # steps whose decode rows read a shared prefix once (tests)
        self._layout = 0  # bumped whenever the live rows change (``_shared`` regroups then)
        self._grouping: tuple[tuple[int, int], _Group | None] | None = None

    # -- the four verbs ---------------------------------------------------------------------
    def start(self) -> None:
        """Device thread: load the weights, check the cache layout works, warm up."""
        from transformers import AutoModelForCausalLM

        kw = dict(self._load_kw, dtype=self.dtype)
        model: Any = AutoModelForCausalLM.from_pretrained(self._source, **kw)
        try:
            model.set_attn_implementation(ATTENTION)  # packed slab attention (``_attention``)
        except (ValueError, ImportError, KeyError) as exc:
            raise InvalidRequest(
                f"{self.model_name}: its attention cannot be replaced by HFBackend's packed slab "
                f"attention ({exc}); use a model whose attention uses transformers' AttentionInterface",
                field="model",
            ) from exc
        self.model = model.to(self.device).eval()
        self.packed_linears = pack_linears(self.model)  # CPU: oneDNN prepacked weights
        logits_width = self.model.get_output_embeddings().weight.shape[0]
        self._penalties = Penalties(logits_width, self.device)
        self._masks = TokenMasks(logits_width, self.device)
        text = self.model.config.get_text_config()
        self._slab = KVSlab(
            layers=text.num_hidden_layers,
            kv_heads=kv_heads(text),
            head_dim=head_dim(text),
            dtype=self.dtype,
            device=self.device,
            headroom=256 if self.cuda_graphs else 64,  # graphs are recaptured at each relayout
        )
        if self._cache is not None:
            self._cache.clear()  # a restart: the old pool's keys/values are gone
            self._slab.allocate_pool(self._cache.capacity * _BLOCK)
        self._warm_up()
        self._build_prefix()
        if self.cuda_graphs:
            self._graphs = DecodeGraphs(self.model, self._slab, self._pad)

    def prepare(self, requests: Sequence[PrepareRequest]) -> list[PreparedPrompt | InvalidRequest]:
        """Host thread: tokenize (chat template for message lists), check the context limit, and
        hint how much of each prompt the prefix cache holds now (``PreparedPrompt.cached_tokens``).
        Thread-safe: a tokenizer per thread (``_tokenize``), a locked peek at the cache."""
        return [self._prepare_one(r.prompt, r.params) for r in requests]

    def step(self, admit: Sequence[NewSequence], drop: Sequence[int]) -> StepResult:
        """Device thread: drop, decode the running rows, prefill and merge the newcomers."""
        if self.model is None:
            raise RuntimeError("HFBackend.step() before start(): the engine must start it first")
        try:
            with torch.inference_mode():
                return self._step(admit, drop)
        except BaseException:
            self._reset()  # the engine fails (and drops) every sequence of a failed step
            raise
        finally:
            self._interrupt.clear()

    def interrupt(self) -> None:
        """Any thread: a newcomer waits. A running step that admits nothing stops before its next
        layer if that pays: when the newcomer's wait saved, the layers still to run counted
        ``_FIRST_TOKEN_WEIGHT`` times, exceeds the layers already run times the rows that redo
        them (docs/architecture.md, "Interrupted steps"). CUDA graph replays are never stopped."""
        self._interrupt.set()

    def close(self) -> None:
        """Device thread: free the KV slab and the weights."""
        self._reset()
        self.model = None
        self._graphs = None
        self._slab = None
        if self.device.type == "cuda":
            torch.cuda.empty_cache()

    # -- introspection (tests, benchmarks) --------------------------------------------------
    @property
    def live_sequences(self) -> int:
        return len(self._rows)

    @property
    def kv_bytes(self) -> int:
        """Bytes the KV slab holds now (0 when the batch is empty)."""
        return self._slab.nbytes() if self._slab is not None else 0

    @property
    def prefix_stats(self) -> PrefixStats:
        """The prefix cache's running totals (all zero when it is off)."""
        return self._cache.stats if self._cache is not None else PrefixStats()

    @property
    def cached_tokens(self) -> int:
        """Tokens the prefix cache holds now."""
        return self._cache.cached_tokens if self._cache is not None else 0

    @property
    def slab(self) -> KVSlab | None:
        return self._slab

    def tokenize(self, prompt: Prompt) -> list[int]:
        """The token ids ``prepare`` gives ``prompt`` (chat lists through the chat template). Unless
        ``allow_special_tokens``, special-token text in the prompt or a message stays literal text.
        Token ids are checked against the vocabulary and kept as they are. Thread-safe (a
        tokenizer per thread); a prompt far over the context raises :class:`PromptTooLong`
        without being tokenized whole (``_tokenize``)."""
        if isinstance(prompt, TokenIds):
            return self._check_ids(prompt.ids)
        tok = self._tokenizers.get()
        if isinstance(prompt, str):
            return self._encode(tok, prompt, add_special_tokens=True)
        if not getattr(self.tokenizer, "chat_template", None):
            raise InvalidRequest(
                f"{self.model_name} has no chat template: send a text prompt instead of messages",
                field="messages",
            )
        messages = [dict(m) for m in prompt]
        if self.allow_special_tokens or not any(self._has_special(m.get("content", "")) for m in messages):
            return self._capped(tok, self._render(tok, messages), "messages", add_special_tokens=False)
        return self._render_literal(tok, messages)

    def _check_ids(self, ids: tuple[int, ...]) -> list[int]:
        if max(ids) >= self._vocab:
            raise InvalidRequest(
                f"prompt token id {max(ids)} is outside {self.model_name}'s vocabulary: use ids in "
                f"[0, {self._vocab})",
                field="prompt",
            )
        return list(ids)

    @staticmethod
    def _render(tok: Any, messages: list[dict[str, str]]) -> str:
        return str(tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=False))

    def _render_literal(self, tok: Any, messages: list[dict[str, str]]) -> list[int]:
        """Render the template around placeholders, then tokenize its own text with special tokens
        parsed and each message's content with them split (so literal)."""
        marks = [f"\x00{i}\x00" for i in range(len(messages))]
        text = self._render(tok, [m | {"content": mark} for m, mark in zip(messages, marks, strict=True)])
        ids: list[int] = []
        for i, (m, mark) in enumerate(zip(messages, marks, strict=True)):
            head, found, text = text.partition(mark)
            if not found:  # the template dropped or changed this message: no safe rendering
                raise InvalidRequest(
                    f"messages[{i}] contains special-token text and {self.model_name}'s chat "
                    "template cannot keep it literal: remove the special tokens from it",
                    field="messages",
                )
            ids += self._capped(tok, head, "messages", add_special_tokens=False)
            ids += self._encode(tok, m.get("content", ""), add_special_tokens=False, what="messages")
        return ids + self._capped(tok, text, "messages", add_special_tokens=False)

    def _has_special(self, text: str) -> bool:
        return any(t in text for t in self._special_texts)

    def _encode(self, tok: Any, text: str, *, add_special_tokens: bool, what: str = "prompt") -> list[int]:
        literal = not self.allow_special_tokens and self._has_special(text)
        kw = {"split_special_tokens": True} if literal else {}
        return self._capped(tok, text, what, add_special_tokens=add_special_tokens, **kw)

    def _capped(self, tok: Any, text: str, what: str, **kw: Any) -> list[int]:
        return encode_capped(tok, text, limit=self.max_context - 1, what=what, **kw)

    # -- prepare ----------------------------------------------------------------------------
    def _prepare_one(self, prompt: Prompt, params: SamplingParams) -> PreparedPrompt | InvalidRequest:
        try:
            ids = self.tokenize(prompt)
        except InvalidRequest as exc:
            return exc
        if not ids:
            return InvalidRequest("the prompt tokenizes to nothing: send some text", field="prompt")
        if params.response_format is not None:
            try:  # compiled here, on the host thread: a schema that does not compile is a 400
                self._grammars().check(params.response_format)
            except InvalidRequest as exc:
                return exc
        vocab = self._vocab
        if params.logit_bias and params.logit_bias[-1][0] >= vocab:  # sorted by token id
            return InvalidRequest(
                f"logit_bias names token {params.logit_bias[-1][0]}, but {self.model_name}'s "
                f"vocabulary has {vocab} tokens: use ids in [0, {vocab})",
                field="logit_bias",
            )
        limit = self.max_context
        if len(ids) >= limit:
            return PromptTooLong(
                f"prompt has {len(ids)} tokens; {self.model_name}'s context is {limit} tokens "
                "(prompt + at least one generated token): shorten the prompt",
                limit=limit,
                requested=len(ids),
            )
        total = len(ids) + params.max_tokens
        if total > limit:
            return PromptTooLong(
                f"prompt ({len(ids)} tokens) + max_tokens ({params.max_tokens}) = {total} exceeds "
                f"{self.model_name}'s context of {limit} tokens: shorten the prompt or lower "
                f"max_tokens to {limit - len(ids)}",
                limit=limit,
                requested=total,
                field="max_tokens",
            )
        return PreparedPrompt(ids, self._cache.peek(ids) if self._cache is not None else 0)

    # -- step -------------------------------------------------------------------------------
    def _step(self, admit: Sequence[NewSequence], drop: Sequence[int]) -> StepResult:
        assert self._slab is not None
        if self._unstored:
            self._store_newcomers()
        if drop:
            self._remove({*drop})
        failed: dict[int, BaseException] = {}
        admit = [a for a in admit if not self._blame(a, failed)]
        if not admit and not self._rows:
            return StepResult([], failed)
        n = len(self._rows)
        slab = self._slab
        slab.reserve(
            new_rows=len(admit), left=max((len(a.prompt_ids) for a in admit), default=1) - 1, right=1
        )
        plan = self._plan(admit)
        if not admit:  # nothing changed yet but the drops: a newcomer may stop this step
            plan.halt = self._halter(n)
        tok, special = self._decode_tokenizer, self._special
        self._rows += [
            Row.new(a.seq_id, a.prompt_ids, a.params, tok, special, self._matcher(a)) for a in admit
        ]
        self._layout += bool(admit)
        penalties = self._penalties
        assert penalties is not None
        penalties.admit(n, [a.prompt_ids for a in admit], [a.params for a in admit])
        try:
            logits = self._forward(plan)  # on failure ``step`` resets everything
        except StepInterrupted:  # keys/values written at column ``end`` are rewritten next step
            return StepResult([], failed, interrupted=True)
        slab.end = plan.col + 1
        slab.add_rows([len(a.prompt_ids) for a in admit])
        if self._cache is not None:  # their blocks are stored at the next step's start: not
            # on the way to their first token (~1.3 ms for a 400-token prompt in float32)
            self._tokens.update((a.seq_id, list(a.prompt_ids)) for a in admit)
            self._unstored.update(a.seq_id for a in admit)
        for r in self._rows[:n]:
            r.position += 1
        self._asking += sum(a.params.logprobs is not None for a in admit)
        # the raw distribution, before penalties change ``logits`` in place (``_sampling``)
        asked = top_logprobs(logits, [r.params.logprobs for r in self._rows]) if self._asking else None
        logits = penalties.apply(logits, [r.params for r in self._rows])
        if self._constrained:  # structured output: ban the tokens that would leave each grammar
            assert self._masks is not None
            logits = self._masks.apply(logits, [r.matcher for r in self._rows])
        tokens = sample(logits, [r.sampler for r in self._rows], self._generator)
        penalties.record(tokens)
        outputs = [
            row.advance(t, self._eos, self.max_context) for row, t in zip(self._rows, tokens, strict=True)
        ]
        if self._constrained:
            self._blame_stuck(outputs, failed)
        if asked is not None:
            for i, entry in zip(asked.rows, asked.entries(tokens, self._token_bytes), strict=True):
                outputs[i].logprobs = (entry,)
        if self._cache is not None:
            for o in outputs:
                self._tokens[o.seq_id] += o.token_ids
        finished = {o.seq_id for o in outputs if o.finish_reason is not None} | failed.keys()
        if finished:
            self._remove(finished)
        return StepResult(outputs, failed, computed_tokens=plan.tokens, cached_tokens=plan.cached)

    def _halter(self, rows: int) -> Callable[[int], bool]:
        """``StepPlan.halt`` for a decode step of ``rows`` rows (see :meth:`interrupt`)."""
        assert self._slab is not None
        event, layers = self._interrupt, self._slab.layers

        def halt(layer: int) -> bool:
            return event.is_set() and (layers - layer) * _FIRST_TOKEN_WEIGHT > layer * rows

        return halt

    def _grammars(self) -> GrammarCompiler:
        """The grammar compiler, built at the first request with a ``response_format`` (its view
        of the tokenizer takes ~0.4 s); any thread."""
        with self._grammar_lock:
            if self._grammar is None:
                vocab = self.config.get_text_config().vocab_size  # the logits' width
                self._grammar = GrammarCompiler(self.tokenizer, vocab=vocab, eos=sorted(self._eos))
            return self._grammar

    def _matcher(self, new: NewSequence) -> Matcher | None:
        """A newcomer's grammar state (``None``: free text); a resumed sequence's is advanced past
        the tokens it already generated (the last ``resumed`` of its prompt)."""
        fmt = new.params.response_format
        if fmt is None:
            return None
        self._constrained += 1
        matcher = self._grammars().matcher(fmt)
        for token in new.prompt_ids[len(new.prompt_ids) - new.resumed :] if new.resumed else ():
            matcher.advance(token)
        return matcher

    def _blame_stuck(self, outputs: Sequence[SeqOutput], failed: dict[int, BaseException]) -> None:
        """A constrained row whose grammar cannot go on (a parser limit: the mask kept it from
        leaving the grammar) fails alone, with the tokens it produced so far."""
        for row, out in zip(self._rows, outputs, strict=True):
            if row.matcher is not None and out.finish_reason is None and row.matcher.error:
                failed[row.seq_id] = RuntimeError(f"structured output cannot go on: {row.matcher.error}")

    def _plan(self, admit: Sequence[NewSequence]) -> StepPlan:
        """Lay out the step's packed call: the decode rows' tokens, then each newcomer's prompt
        (less the reused prefix); the decode rows write column ``end``, where prompts end too."""
        slab = self._slab
        assert slab is not None
        n = len(self._rows)
        if n:
            slab.valid[:n, slab.end] = True
        cache = self._cache
        hits = [cache.match(a.prompt_ids) if cache is not None else ([], 0) for a in admit]
        skips = [tokens for _, tokens in hits]
        sources: list[int] = []  # pool cells, token by token (a prefix may end inside its last block)
        for slots, tokens in hits:
            for k, slot in enumerate(slots):
                sources += range(slot * _BLOCK, slot * _BLOCK + min(_BLOCK, tokens - k * _BLOCK))
        ids = [r.last for r in self._rows]
        pos = [r.position for r in self._rows]
        for a, skip in zip(admit, skips, strict=True):
            ids += a.prompt_ids[skip:]
            pos += range(skip, len(a.prompt_ids))
        plan = plan_step(slab, n, [len(a.prompt_ids) for a in admit], skips, ids, pos, sources)
        if n >= _SHARED_MIN_ROWS and self._graphs is None:
            plan.shared = self._shared(n, plan.col)
            self.shared_prefix_steps += plan.shared is not None
        return plan

    def _shared(self, n: int, col: int) -> Shared | None:
        """The largest group of decode rows whose prompts start with the same
        ``_SHARED_MIN_TOKENS`` or more tokens (a system prompt), if it has ``_SHARED_MIN_ROWS``.
        The grouping is redone only when the rows or the slab's layout changed; a step adds only
        its mask (a few tensor ops, whatever the row count)."""
        slab = self._slab
        assert slab is not None
        key = (self._layout, slab.relayouts)  # rows admitted or removed, or the slab relaid out
        if self._grouping is None or self._grouping[0] != key:
            self._grouping = (key, self._group(n))
        group = self._grouping[1]
        if group is None:
            return None
        members, starts, leader, length, rest = group
        columns = torch.arange(rest, col + 1, device=slab.device)
        allowed = slab.valid[:n, rest : col + 1] & (columns >= starts.unsqueeze(1))
        mask = torch.zeros(allowed.shape, dtype=torch.float32, device=slab.device)
        mask.masked_fill_(~allowed, float("-inf"))
        return Shared(
            members=members,
            leader=leader,
            first=slab.first[leader],
            length=length,
            rest=rest,
            mask=mask.view(n, 1, 1, -1),
        )

    def _group(self, n: int) -> _Group | None:
        """For ``_shared``: the members, each decode row's first own column (past the shared
        prefix for members), the leader, the shared length and the first column any row owns."""
        slab = self._slab
        assert slab is not None
        groups: dict[tuple[int, ...], list[int]] = {}
        for i, row in enumerate(self._rows[:n]):
            if len(row.prompt) >= _SHARED_MIN_TOKENS:
                groups.setdefault(row.prompt[:_SHARED_MIN_TOKENS], []).append(i)
        members = max(groups.values(), key=len, default=[])
        if len(members) < _SHARED_MIN_ROWS:
            return None
        length = common_prefix([self._rows[i].prompt for i in members])
        starts = list(slab.first[:n])
        for i in members:
            starts[i] += length
        device = slab.device
        return (
            torch.tensor(members, device=device),
            torch.tensor(starts, device=device),
            members[0],
            length,
            min(starts),
        )

    def _forward(self, plan: StepPlan) -> torch.Tensor:
        """Run the packed call of ``plan`` (see ``_plan``); the logits of each row's last token.
        The model gets no cache: the attention function writes the slab under the plan. With
        ``cuda_graphs``, a decode-only step replays its bucket's graph (``_graphs``)."""
        replayed = self._graphs.decode(plan) if self._graphs is not None else None
        if replayed is not None:
            return replayed
        out = self.model(
            input_ids=plan.ids.unsqueeze(0),
            attention_mask=self._no_mask,  # 4-D: transformers builds no mask of its own
            position_ids=plan.positions.unsqueeze(0),
            use_cache=False,
            logits_to_keep=plan.keep,
            slab_plan=plan,
        )
        self.attention_calls = plan.attended
        logits: torch.Tensor = out.logits[0]
        return logits

    def _blame(self, new: NewSequence, failed: dict[int, BaseException]) -> bool:
        ids = new.prompt_ids
        vocab = self.model.get_input_embeddings().num_embeddings
        if not ids or min(ids) < 0 or max(ids) >= vocab:
            failed[new.seq_id] = InvalidRequest(
                f"prompt token ids must be in [0, {vocab}) and non-empty", field="prompt"
            )
            return True
        if len(ids) + new.params.max_tokens > self.max_context:
            failed[new.seq_id] = PromptTooLong(
                f"prompt + max_tokens exceeds the context of {self.max_context} tokens",
                limit=self.max_context,
                requested=len(ids) + new.params.max_tokens,
            )
            return True
        return False

    def _build_prefix(self) -> None:
        """Put the chat template's fixed prefix into the prefix cache (a system prompt every chat
        prompt starts with)."""
        prefix = chat_prefix(self._decode_tokenizer)  # the device thread's own tokenizer
        if prefix and self._cache is not None:
            with torch.inference_mode():
                self._step([NewSequence(-1, [*prefix, self._pad], SamplingParams(max_tokens=1))], ())

    def _store_rows(self, rows: Sequence[int]) -> None:
        """Index the new full blocks of ``rows``' tokens (those whose keys/values are in the
        slab: the prompt and every generated token but the last) and copy them into the pool."""
        assert self._slab is not None and self._cache is not None
        slab, block = self._slab, _BLOCK
        src_rows: list[int] = []
        src_cols: list[int] = []
        slots: list[int] = []
        for r in rows:
            first = slab.first[r]
            ids = self._tokens[self._rows[r].seq_id][: slab.end - first]
            for pos, slot in self._cache.insert(ids):
                src_rows += [r] * block
                src_cols += range(first + pos, first + pos + block)
                slots += range(slot * block, slot * block + block)
        slab.store(src_rows, src_cols, slots)

    def _store_newcomers(self) -> None:
        """Store the prompt blocks of the last step's newcomers that are still live (``_remove``
        stored those that ended)."""
        rows = [i for i, r in enumerate(self._rows) if r.seq_id in self._unstored]
        self._unstored.clear()
        if rows:
            self._store_rows(rows)

    def _remove(self, seq_ids: set[int]) -> None:
        assert self._slab is not None
        self._unstored -= seq_ids  # stored below with the rest of their tokens
        idx = [i for i, r in enumerate(self._rows) if r.seq_id in seq_ids]
        if not idx:
            return
        self._layout += 1
        if self._cache is not None:
            self._store_rows(idx)  # finished or cancelled turns: their tokens so far
            for i in idx:
                del self._tokens[self._rows[i].seq_id]
        self._asking -= sum(self._rows[i].params.logprobs is not None for i in idx)
        self._constrained -= sum(self._rows[i].matcher is not None for i in idx)
        moves = self._slab.remove(idx)
        for src, dst in moves:
            self._rows[dst] = self._rows[src]
        del self._rows[self._slab.rows :]
        if self._penalties is not None:
            penalised = any(r.params.penalised for r in self._rows)
            self._penalties.moved(list(moves), len(self._rows), penalised)

    def _reset(self) -> None:
        self._rows.clear()
        self._layout += 1
        self._asking = 0
        self._constrained = 0
        if self._penalties is not None:
            self._penalties.moved((), 0, any_penalised=False)
        self._tokens.clear()
        self._unstored.clear()
        if self._slab is not None:
            self._slab.free()

    def _warm_up(self) -> None:
        """Run a prefill, then a decode packed with a second prefill, through the slab; refuse a
        model whose layers do not all attend through the plan (so write the slab)."""
        assert self._slab is not None
        seen: list[int] = []
        eos, self._eos = self._eos, frozenset()  # the warm-up sequences must not stop early
        pad = self._pad
        try:
            with torch.inference_mode():
                for i, length in ((1, 2), (2, 3)):
                    self._step([NewSequence(-i, [pad] * length, SamplingParams(max_tokens=3))], ())
                    seen.append(self.attention_calls)
        finally:
            self._eos = eos
            self._reset()
        layers = self._slab.layers
        if seen != [layers] * 2:
            raise InvalidRequest(
                f"{self.model_name}: its layers do not all use transformers' AttentionInterface "
                f"(attention calls per step: {seen}, expected {layers}), so HFBackend cannot batch "
                "it continuously: use a model with plain full attention",
                field="model",
            )

    def _eos_first(self) -> int:
        pad = self.tokenizer.pad_token_id
        return int(pad) if pad is not None else min(self._eos) if self._eos else 0


# -- helpers ------------------------------------------------------------------------------------


def common_prefix(seqs: Sequence[tuple[int, ...]]) -> int:
    """How many leading tokens all of ``seqs`` share (the lexicographic least and greatest
    bound every other one's agreement)."""
    first, last = min(seqs), max(seqs)
    for i, (a, b) in enumerate(zip(first, last, strict=False)):
        if a != b:
            return i
    return min(len(first), len(last))


def prefix_cache_tokens(setting: bool | int, default: int) -> int:
    """The prefix cache's pool in tokens (whole blocks) for ``prefix_cache=setting``."""
    tokens = default if setting is True else int(setting)
    return max(0, tokens) // _BLOCK * _BLOCK
