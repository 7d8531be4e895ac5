"""Choosing the next token for every row of a batch at once.

Greedy rows take one ``argmax`` over the whole batch (the common case costs one kernel). Sampling
rows are filtered together (temperature, then top-k, then top-p over what top-k kept, as
transformers' warpers do, each a per-row tensor in one op) and drawn by inverse CDF from one
uniform number per row: a seeded row takes it from its own ``torch.Generator`` (it draws the same
numbers whatever shares its batch), the unseeded rows all at once from the backend's generator.
Temperatures below ``GREEDY_BELOW`` are greedy: dividing logits by them overflows float32 (and the
distribution they ask for is the argmax, up to rounding); logits are shifted by their maximum
before the division, so every larger temperature is safe.

Min-p (after temperature, before top-k/top-p, as vLLM orders it) keeps the tokens whose
probability is at least ``min_p`` times the row's top one. Penalties and logit bias change the
logits before all of this (:class:`Penalties`).

Log-probabilities (:func:`top_logprobs`) are taken from the model's raw distribution, before
penalties, logit bias, temperature and the filters: what the model itself says of each token, the
same whatever sampling settings a request uses (vLLM's default, ``raw_logprobs``). It is one
``log_softmax`` and one ``topk`` over the rows that asked; a batch where no row asked runs neither.

Top-p needs sorted probabilities; sorting a whole vocabulary per row is slow, so rows are sorted
within their top ``_CANDIDATES`` only, and a row whose nucleus is not complete within them (a very
flat distribution) falls back to a full sort. The result is exact either way.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from batcher.backend import Logprobs, SamplingParams, TokenLogprob

__all__ = ["GREEDY_BELOW", "Penalties", "RowSampler", "TopLogprobs", "sample", "top_logprobs"]

_CANDIDATES = 256
GREEDY_BELOW = 1e-6


class RowSampler:
    """The sampling parameters of one row, and its own generator if it is seeded."""

    __slots__ = ("generator", "min_p", "temperature", "top_k", "top_p")

    def __init__(
        self, *, temperature: float, top_k: int, top_p: float, seed: int | None, min_p: float = 0.0
    ) -> None:
        self.temperature, self.top_k, self.top_p, self.min_p = temperature, top_k, top_p, min_p
        self.generator: torch.Generator | None = None
        if seed is not None:
            self.generator = torch.Generator(device="cpu")
            self.generator.manual_seed(seed)

    @property
    def greedy(self) -> bool:
        return self.temperature < GREEDY_BELOW


def sample(
    logits: torch.Tensor, samplers: Sequence[RowSampler | None], generator: torch.Generator
) -> list[int]:
    """One token per row of ``logits`` ([rows, vocab]); ``None`` (or a greedy sampler) = argmax.
    Unseeded sampling rows draw from ``generator``."""
    tokens = logits.argmax(dim=-1)
    rows = [i for i, s in enumerate(samplers) if s is not None and not s.greedy]
    if rows:
        chosen = [s for s in samplers if s is not None and not s.greedy]
        drawn = _draw(logits[rows].float(), chosen, _uniforms(chosen, generator))
        tokens[torch.tensor(rows, device=tokens.device)] = drawn.to(tokens.device)
    return [int(t) for t in tokens.tolist()]


@dataclass(frozen=True, slots=True)
class TopLogprobs:
    """The log-probabilities of the rows that asked for them, computed before sampling: each
    row's whole distribution (to look up the token it will sample) and its top ``k``."""

    rows: list[int]  # batch rows that asked, in order
    ks: list[int]  # how many alternatives each of them asked for
    logprobs: torch.Tensor  # [len(rows), vocab] float32
    top_values: torch.Tensor  # [len(rows), max(ks)]
    top_ids: torch.Tensor

    def entries(self, tokens: Sequence[int], token_bytes: Callable[[int], bytes]) -> list[Logprobs]:
        """One :class:`Logprobs` per asking row, for the ``tokens`` sampled (one per batch row)."""
        chosen_ids = [tokens[r] for r in self.rows]
        at = torch.tensor(chosen_ids, device=self.logprobs.device).unsqueeze(1)
        chosen = self.logprobs.gather(1, at).squeeze(1).tolist()
        values, ids = self.top_values.tolist(), self.top_ids.tolist()
        return [
            Logprobs(
                TokenLogprob(t, lp, token_bytes(t)),
                tuple(
                    TokenLogprob(i, v, token_bytes(i)) for i, v in zip(ids[j][:k], values[j][:k], strict=True)
                ),
            )
            for j, (t, lp, k) in enumerate(zip(chosen_ids, chosen, self.ks, strict=True))
        ]


def top_logprobs(logits: torch.Tensor, asks: Sequence[int | None]) -> TopLogprobs | None:
    """The raw log-probabilities of the rows of ``logits`` whose ``asks`` entry is not None (the
    number of alternatives each wants): one batched ``log_softmax`` and ``topk``. None if no row
    asked. Call before anything changes ``logits`` in place (penalties)."""
    rows = [i for i, k in enumerate(asks) if k is not None]
    if not rows:
        return None
    ks = [k for k in asks if k is not None]
    sub = logits if len(rows) == len(asks) else logits[torch.tensor(rows, device=logits.device)]
    logprobs = torch.log_softmax(sub.float(), dim=-1)
    values, ids = torch.topk(logprobs, max(ks), dim=-1)
    return TopLogprobs(rows, ks, logprobs, values, ids)


def _uniforms(samplers: Sequence[RowSampler], generator: torch.Generator) -> torch.Tensor:
    """One uniform number per row: seeded rows from their own generator, the rest in one draw."""
    u = torch.rand(len(samplers), generator=generator)
    for i, s in enumerate(samplers):
        if s.generator is not None:
            u[i] = torch.rand((), generator=s.generator)
    return u


def _draw(logits: torch.Tensor, samplers: Sequence[RowSampler], u: torch.Tensor) -> torch.Tensor:
    device = logits.device
    temps = torch.tensor([s.temperature for s in samplers], device=device).unsqueeze(1)
    shifted = logits - logits.amax(dim=-1, keepdim=True)  # <= 0: no overflow whatever the temperature
    probs = torch.softmax(shifted / temps, dim=-1)
    u = u.to(device)
    if any(s.min_p > 0.0 for s in samplers):  # min-p: drop tokens below min_p * the top probability
        min_p = torch.tensor([s.min_p for s in samplers], device=device).unsqueeze(1)
        probs = probs * (probs >= min_p * probs.amax(dim=-1, keepdim=True))
        probs = probs / probs.sum(dim=-1, keepdim=True)  # so top-p still finds its mass in the top
    if all(s.top_k == 0 and s.top_p >= 1.0 for s in samplers):
        return _inverse_cdf(probs, u)
    vocab = probs.shape[-1]
    k = min(vocab, max([_CANDIDATES, *(s.top_k for s in samplers)]))
    vals, idx = torch.topk(probs, k, dim=-1)
    top_k = torch.tensor([s.top_k or vocab for s in samplers], device=device)
    top_p = torch.tensor([s.top_p for s in samplers], device=device)
    complete = _nucleus_complete(vals, top_k, top_p)
    if not bool(complete.all()) and k < vocab:
        vals, idx = torch.sort(probs, dim=-1, descending=True)
    keep = _keep_mask(vals, top_k, top_p)
    picked = _inverse_cdf(vals * keep, u)
    return idx.gather(1, picked.unsqueeze(1)).squeeze(1)


def _nucleus_complete(vals: torch.Tensor, top_k: torch.Tensor, top_p: torch.Tensor) -> torch.Tensor:
    """Whether each row's kept set lies within the candidates ``vals`` (sorted, descending): its
    top-k fits, or (no top-k) the candidates already hold the top-p mass."""
    return (top_k <= vals.shape[-1]) | ((top_p < 1.0) & (vals.sum(-1) >= top_p))


def _keep_mask(vals: torch.Tensor, top_k: torch.Tensor, top_p: torch.Tensor) -> torch.Tensor:
    rank = torch.arange(vals.shape[-1], device=vals.device).unsqueeze(0)
    keep = rank < top_k.unsqueeze(1)
    kept = vals * keep
    kept = kept / kept.sum(-1, keepdim=True)
    before = kept.cumsum(-1) - kept  # mass of the better-ranked tokens
    keep &= before < top_p.unsqueeze(1)
    keep[:, 0] = True
    return keep


def _inverse_cdf(weights: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    cdf = weights.cumsum(-1)
    target = (u * cdf[:, -1]).unsqueeze(1)
    picked = torch.searchsorted(cdf, target, right=True).squeeze(1)
    return picked.clamp_(max=weights.shape[-1] - 1)


class Penalties:
    """Presence, frequency and repetition penalties and logit bias, for the whole batch at once.

    Holds a ``[rows, vocab]`` count of each row's generated tokens and a mask of its prompt tokens,
    aligned with the backend's rows; they exist only while some live row is penalised, so a batch
    without penalties pays nothing. Each step is a few batched ops over the penalised rows (their
    parameters as per-row tensors), as vLLM and transformers define them: repetition divides a
    positive logit (multiplies a negative one) of every token seen in the prompt or the output;
    frequency subtracts ``penalty * count``; presence subtracts ``penalty`` once a token appeared.
    """

    def __init__(self, vocab: int, device: torch.device) -> None:
        self.vocab, self.device = vocab, device
        self.counts: torch.Tensor | None = None  # [rows, vocab] float32: generated-token counts
        self.prompt: torch.Tensor | None = None  # [rows, vocab] bool: tokens of the prompt

    def admit(
        self, n_before: int, prompts: Sequence[Sequence[int]], params: Sequence[SamplingParams]
    ) -> None:
        """New rows appended after ``n_before`` live ones: start their counts (if any row needs them)."""
        if self.counts is None and not any(p.penalised for p in params):
            return
        rows = n_before + len(prompts)
        if self.counts is None:
            self.counts = torch.zeros(rows, self.vocab, device=self.device)
            self.prompt = torch.zeros(rows, self.vocab, dtype=torch.bool, device=self.device)
        else:
            assert self.prompt is not None
            extra = rows - self.counts.shape[0]
            self.counts = torch.cat([self.counts, self.counts.new_zeros(extra, self.vocab)])
            self.prompt = torch.cat([self.prompt, self.prompt.new_zeros(extra, self.vocab)])
        for i, (ids, p) in enumerate(zip(prompts, params, strict=True)):
            if p.repetition_penalty != 1.0:  # only repetition looks at the prompt
                self.prompt[n_before + i, torch.tensor(ids, device=self.device)] = True

    def moved(self, moves: Sequence[tuple[int, int]], rows: int, any_penalised: bool) -> None:
        """Mirror the backend's row compaction (``src -> dst``, then ``rows`` remain)."""
        if self.counts is None or self.prompt is None:
            return
        if not any_penalised:
            self.counts = self.prompt = None
            return
        if moves:
            src = torch.tensor([s for s, _ in moves], device=self.device)
            dst = torch.tensor([d for _, d in moves], device=self.device)
            self.counts[dst] = self.counts[src]
            self.prompt[dst] = self.prompt[src]
        self.counts, self.prompt = self.counts[:rows], self.prompt[:rows]

    def apply(self, logits: torch.Tensor, params: Sequence[SamplingParams]) -> torch.Tensor:
        """``logits`` ([rows, vocab], one per live row) with each penalised row's penalties applied
        (in place: the step's logits are not used again). Only the penalties some row uses run."""
        if self.counts is None or self.prompt is None:
            return logits
        rows = [i for i, p in enumerate(params) if p.penalised]
        if not rows:
            return logits
        device = logits.device
        every = len(rows) == len(params)  # no gather/scatter when the whole batch is penalised
        idx = None if every else torch.tensor(rows, device=device)
        chosen = [params[i] for i in rows] if idx is not None else list(params)
        sub = (logits if every else logits[idx]).float()  # may be ``logits``: changed in place
        counts = self.counts if idx is None else self.counts[idx]
        # Only the seen tokens change (a few hundred of a row's vocabulary): gather them, penalise
        # the short vector, scatter it back (dense ``where``s over [rows, vocab] cost 10x more).
        if any(p.repetition_penalty != 1.0 for p in chosen):
            rep = torch.tensor([p.repetition_penalty for p in chosen], device=device)
            seen = (counts > 0) | (self.prompt if idx is None else self.prompt[idx])
            r, c = seen.nonzero(as_tuple=True)
            v, by = sub[r, c], rep[r]
            sub[r, c] = torch.where(v > 0, v / by, v * by)
        if any(p.frequency_penalty or p.presence_penalty for p in chosen):
            freq = torch.tensor([p.frequency_penalty for p in chosen], device=device)
            pres = torch.tensor([p.presence_penalty for p in chosen], device=device)
            r, c = counts.nonzero(as_tuple=True)
            sub[r, c] -= freq[r] * counts[r, c] + pres[r]
        bias = [(j, t, b) for j, p in enumerate(chosen) for t, b in p.logit_bias if t < self.vocab]
        if bias:
            rb, tb, vb = zip(*bias, strict=True)
            at = (torch.tensor(rb, device=device), torch.tensor(tb, device=device))
            sub.index_put_(at, torch.tensor(vb, device=device), accumulate=True)
        if idx is None:
            return sub
        logits[idx] = sub.to(logits.dtype)
        return logits

    def record(self, tokens: Sequence[int]) -> None:
        """Count the step's sampled token of every row (one indexed add)."""
        if self.counts is None:
            return
        rows = torch.arange(len(tokens), device=self.device)
        self.counts[rows, torch.tensor(tokens, device=self.device)] += 1.0
