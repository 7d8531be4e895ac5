"""Choosing the next token for every row of a batch at once.

Greedy rows take one ``argmax`` over the whole batch (the common case costs one kernel). Sampling
rows are filtered together (temperature, then top-k, then top-p over what top-k kept, as
transformers' warpers do, each a per-row tensor in one op) and drawn by inverse CDF from one
uniform number per row: a seeded row takes it from its own ``torch.Generator`` (it draws the same
numbers whatever shares its batch), the unseeded rows all at once from the backend's generator.
Temperatures below ``GREEDY_BELOW`` are greedy: dividing logits by them overflows float32 (and the
distribution they ask for is the argmax, up to rounding); logits are shifted by their maximum
before the division, so every larger temperature is safe.

Top-p needs sorted probabilities; sorting a whole vocabulary per row is slow, so rows are sorted
within their top ``_CANDIDATES`` only, and a row whose nucleus is not complete within them (a very
flat distribution) falls back to a full sort. The result is exact either way.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

__all__ = ["GREEDY_BELOW", "RowSampler", "sample"]

_CANDIDATES = 256
GREEDY_BELOW = 1e-6


class RowSampler:
    """The sampling parameters of one row, and its own generator if it is seeded."""

    __slots__ = ("generator", "temperature", "top_k", "top_p")

    def __init__(self, *, temperature: float, top_k: int, top_p: float, seed: int | None) -> None:
        self.temperature, self.top_k, self.top_p = temperature, top_k, top_p
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
