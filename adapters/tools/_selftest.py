"""``selftest``: does batching change greedy outputs? Solo runs against a staggered crowd.

1. *solo*: each prompt alone through a :class:`~batcher.Batcher` (greedy, ``max_tokens``).
2. *crowd*: all prompts through the same Batcher at once, staggered so that newcomers join a
   running batch at different points (prompt i starts once prompt i-1 has 0, 1 or 2 tokens), with
   an extra copy of every third prompt that is cancelled after 0-3 tokens (so rows leave the batch
   mid-run). The copies are not re-run: their tokens up to the cancel must be a prefix of the
   solo run's, and they are reported on their own lines.
3. Each crowd run is compared with its solo run token by token. At the first difference, one
   solo forward pass of the backend's model over the prompt and the common tokens gives the
   logit margin ``logit(solo token) - logit(batched token)``: below ``--near-tie`` the two were
   nearly tied (rounding can flip them), above it the batch changed the output. A backend without
   a ``model`` to ask (the fake backend) has no margins: every divergence is a bug there.

Exit status 1 when any prompt diverged beyond a near-tie or failed, else 0.
"""

from __future__ import annotations

import asyncio
import sys
from argparse import Namespace
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, TextIO

from batcher import BatchConfig, Batcher, BatcherError, Prompt, TokenIds

from ._compare import Divergence, Status, first_divergence, status
from ._setup import SELFTEST_PROMPTS, make_backend, progress_bar, prompts

__all__ = ["run_selftest"]


@dataclass(slots=True)
class _Run:
    """One request of the test: which prompt, the tokens it got, and how it ended."""

    index: int
    cancel_after: int | None = None  # a cancelled copy: leave after this many tokens
    tokens: list[int] = field(default_factory=list)
    error: str | None = None


class _Progress:
    """How many tokens a crowd run has received; others wait on it (events, not polling)."""

    def __init__(self) -> None:
        self.count = 0
        self.done = False
        self._changed = asyncio.Condition()

    async def add(self, tokens: int, *, done: bool = False) -> None:
        async with self._changed:
            self.count += tokens
            self.done = self.done or done
            self._changed.notify_all()

    async def reached(self, count: int) -> None:
        async with self._changed:
            await self._changed.wait_for(lambda: self.done or self.count >= count)


async def _generate(
    batcher: Batcher, prompt: Prompt, run: _Run, max_tokens: int, progress: _Progress
) -> None:
    try:
        async with batcher.stream(prompt, max_tokens=max_tokens) as stream:
            if run.cancel_after == 0:
                return  # admitted and tokenized, cancelled before its first token
            async for chunk in stream:
                run.tokens += chunk.token_ids
                await progress.add(len(chunk.token_ids))
                if run.cancel_after is not None and len(run.tokens) >= run.cancel_after:
                    return  # leaving the stream cancels the request
    except BatcherError as e:
        run.error = f"{type(e).__name__}: {e}"
    finally:
        await progress.add(0, done=True)


async def _phases(
    backend: Any, prompts: Sequence[Prompt], max_tokens: int
) -> tuple[Any, list[_Run], list[_Run], list[_Run]]:
    """Run both phases; returns the backend's model (kept for the margins after the batcher
    closed), the solo runs, the crowd runs and the cancelled copies."""
    copies = [_Run(i, cancel_after=(i // 3) % 4) for i in range(1, len(prompts), 3)]
    config = BatchConfig(max_queue=max(256, 2 * len(prompts)))
    with progress_bar(total=2 * len(prompts), desc="selftest solo", unit="req") as bar:
        async with Batcher(backend, config) as batcher:
            model = getattr(backend, "model", None)  # a torch module to ask for logits, or None
            model = model if hasattr(model, "parameters") else None
            solo = [_Run(i) for i in range(len(prompts))]
            for run in solo:
                await _generate(batcher, prompts[run.index], run, max_tokens, _Progress())
                bar.update()
            bar.set_description("selftest crowd")
            crowd = [_Run(i) for i in range(len(prompts))]
            progress = [_Progress() for _ in prompts]

            async def start(run: _Run, mine: _Progress) -> None:
                if run.index > 0:
                    await progress[run.index - 1].reached(run.index % 3)
                await _generate(batcher, prompts[run.index], run, max_tokens, mine)
                bar.update(1 if run.cancel_after is None else 0)

            await asyncio.gather(
                *(start(r, progress[r.index]) for r in crowd), *(start(c, _Progress()) for c in copies)
            )
    return model, solo, crowd, copies


def _logit_margin(model: Any, ids: list[int], solo: int, batched: int) -> float:
    """``logit(solo) - logit(batched)`` after ``ids``, from one forward pass of ``model`` alone."""
    import torch

    device = next(model.parameters()).device
    x = torch.tensor([ids], device=device)
    with torch.inference_mode():
        logits = model(input_ids=x, attention_mask=torch.ones_like(x), use_cache=False).logits[0, -1]
    return float(logits[solo].float() - logits[batched].float())


@dataclass(frozen=True, slots=True)
class _Verdict:
    label: str
    run: _Run
    solo: _Run
    divergence: Divergence | None
    margin: float | None
    status: Status


def _judge(
    backend: Any, model: Any, prompts: Sequence[Prompt], solo: _Run, run: _Run, near_tie: float
) -> _Verdict:
    label = f"#{run.index}" + (
        "" if run.cancel_after is None else f" copy, cancelled after {run.cancel_after}"
    )
    if run.error or solo.error:
        return _Verdict(label, run, solo, None, None, "failed")
    div = first_divergence(solo.tokens, run.tokens, prefix=run.cancel_after is not None)
    margin = None
    if div is not None and div.solo is not None and div.batched is not None and model is not None:
        ids = list(backend.tokenize(prompts[run.index])) + solo.tokens[: div.index]
        margin = _logit_margin(model, ids, div.solo, div.batched)
    return _Verdict(label, run, solo, div, margin, status(div, margin, near_tie))


def _token(backend: Any, token: int | None) -> str:
    if token is None:
        return "(ended)"
    tokenizer = getattr(backend, "tokenizer", None)
    return f"{token} {tokenizer.decode([token])!r}" if tokenizer is not None else str(token)


def _text(prompt: Prompt) -> str:
    if isinstance(prompt, TokenIds):
        return f"token ids {prompt.ids[:6]}"
    text = prompt if isinstance(prompt, str) else prompt[-1]["content"]
    return text if len(text) <= 40 else text[:39] + "…"


def _table(backend: Any, prompts: Sequence[Prompt], verdicts: Sequence[_Verdict], out: TextIO) -> None:
    print(
        f"{'run':<28} {'prompt':<41} {'solo':>4} {'crowd':>5}  {'result':<8}  "
        f"{'at':>3}  {'solo token':<18} {'crowd token':<18} {'margin':>8}",
        file=out,
    )
    for v in verdicts:
        line = (
            f"{v.label:<28} {_text(prompts[v.run.index]):<41} {len(v.solo.tokens):>4} "
            f"{len(v.run.tokens):>5}  {v.status:<8}"
        )
        if v.divergence is not None:
            d = v.divergence
            margin = "n/a" if v.margin is None else f"{v.margin:.4f}"
            line += (
                f"  {d.index:>3}  {_token(backend, d.solo):<18} {_token(backend, d.batched):<18} {margin:>8}"
            )
        if v.status == "failed":
            line += f"  {v.run.error or v.solo.error}"
        print(line, file=out)


def _near_tie(args: Namespace, backend: Any) -> float:
    if args.near_tie is not None:
        return float(args.near_tie)
    return 0.01 if "float32" in str(getattr(backend, "dtype", "float32")) else 0.5


def run_selftest(args: Namespace, out: TextIO = sys.stdout) -> int:
    """The ``selftest`` command: returns its exit status."""
    work = prompts(args.prompts, SELFTEST_PROMPTS, chat=not args.completion)
    backend = make_backend(args)
    model, solo, crowd, copies = asyncio.run(_phases(backend, work, args.max_tokens))
    threshold = _near_tie(args, backend)
    verdicts = [_judge(backend, model, work, solo[r.index], r, threshold) for r in (*crowd, *copies)]
    _table(backend, work, verdicts, out)
    counts = {s: sum(v.status == s for v in verdicts) for s in ("equal", "near-tie", "DIVERGED", "failed")}
    bad = [v for v in verdicts if v.status in ("DIVERGED", "failed")]
    print(
        f"\nselftest on {getattr(backend, 'model_name', args.model)}: {len(crowd)} prompts and "
        f"{len(copies)} cancelled copies (compared as prefixes, not re-run), greedy, max_tokens "
        f"{args.max_tokens}, near-tie below a logit margin of {threshold:g}"
        + ("" if model is not None else " (no model to ask: every divergence counts)"),
        file=out,
    )
    print(", ".join(f"{n} {s}" for s, n in counts.items()), file=out)
    for v in bad:
        print(f"{v.status}: {v.label}: {_text(work[v.run.index])!r}", file=out)
    print("FAIL" if bad else "PASS", file=out)
    return 1 if bad else 0
