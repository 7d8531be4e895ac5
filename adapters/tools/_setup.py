"""What both commands share: the built-in prompts, ``--prompts FILE``, and building the backend."""

from __future__ import annotations

import importlib
import importlib.util
import sys
from argparse import Namespace
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from batcher import InvalidRequest, Prompt
from batcher.testing import FakeBackend

__all__ = [
    "BENCH_PROMPTS",
    "SELFTEST_PROMPTS",
    "load_factory",
    "make_backend",
    "progress_bar",
    "prompts",
]

#: bench's workload: requests that invite long answers, so max_tokens, not EOS, usually ends them.
BENCH_PROMPTS: tuple[str, ...] = (
    "Write a detailed essay about the history of bridges.",
    "Explain step by step how a refrigerator keeps food cold.",
    "Tell me a long story about a lighthouse keeper and a storm.",
    "Give a thorough lecture on how bees make honey.",
    "Describe in detail how a city plans its public transport.",
    "Explain to a curious student why the sky changes colour at sunset.",
    "Write a long letter from a sailor to his family about life at sea.",
    "Give a detailed account of how paper is made from trees.",
    "Explain at length how a compiler turns source code into a program.",
    "Tell a long fairy tale about a clockmaker who could stop time.",
    "Describe in detail the journey of a drop of water through a river system.",
    "Write a thorough guide to growing tomatoes in a small garden.",
    "Explain step by step how an election is organised and counted.",
    "Give a detailed lecture on the causes of the seasons on Earth.",
    "Write a long diary entry of an astronaut on her first day in orbit.",
    "Explain in depth how a musical instrument produces its sound.",
)

#: selftest's prompts: varied lengths and kinds (questions, lists, code, arithmetic, other languages).
SELFTEST_PROMPTS: tuple[str, ...] = (
    "What is the capital of France?",
    "List five fruits that are red.",
    "Write a haiku about autumn leaves.",
    "Explain what a hash table is in two sentences.",
    "Write a Python function that reverses a string.",
    "What is 17 multiplied by 23?",
    "Translate 'good morning, how are you?' into Spanish.",
    "Give three tips for sleeping better.",
    "Describe the colour blue to someone who cannot see.",
    "Summarise the plot of Romeo and Juliet in one paragraph.",
    "Why do cats purr?",
    "Name the planets of the solar system in order from the Sun.",
)


def prompts(path: str | None, builtin: Sequence[str], *, chat: bool) -> list[Prompt]:
    """The prompts of ``--prompts FILE`` (one per line, blank lines skipped) or the built-in ones,
    each as a one-message chat (``chat``) or as plain completion text."""
    if path is None:
        lines = list(builtin)
    else:
        try:
            text = Path(path).read_text(encoding="utf-8")
        except OSError as e:
            raise InvalidRequest(f"cannot read --prompts {path}: {e.strerror}", field="prompts") from e
        lines = [line.strip() for line in text.splitlines() if line.strip()]
        if not lines:
            raise InvalidRequest(f"--prompts {path} holds no prompt: write one per line", field="prompts")
    if not chat:
        return list(lines)
    return [[{"role": "user", "content": line}] for line in lines]


def load_factory(spec: str) -> Callable[..., Any]:
    """``MODULE:NAME`` or ``FILE.py:NAME`` → the named object (a backend class or factory)."""
    where, _, name = spec.rpartition(":")
    if not where or not name.isidentifier():
        raise InvalidRequest(f"--backend must be MODULE:NAME or FILE.py:NAME, got {spec!r}", field="backend")
    if where.endswith(".py"):
        module_name = f"_llm_batcher_backend_{Path(where).stem}"
        file_spec = importlib.util.spec_from_file_location(module_name, where)
        if file_spec is None or file_spec.loader is None or not Path(where).is_file():
            raise InvalidRequest(f"--backend: no Python file at {where}", field="backend")
        module = importlib.util.module_from_spec(file_spec)
        sys.modules[module_name] = module
        file_spec.loader.exec_module(module)
    else:
        module = importlib.import_module(where)
    factory: Callable[..., Any] | None = getattr(module, name, None)
    if not callable(factory):
        raise InvalidRequest(f"--backend: {where} has no callable {name!r}", field="backend")
    return factory


def make_backend(args: Namespace) -> Any:
    """The backend the flags ask for: ``--backend`` called as ``factory(model, dtype=, device=)``,
    the fake backend for ``--model fake``, else :class:`~batcher.adapters.HFBackend`."""
    if args.backend is not None:
        return load_factory(args.backend)(args.model, dtype=args.dtype, device=args.device)
    if args.model == "fake":
        return FakeBackend(step_time_s=args.fake_step, step_time_per_seq_s=args.fake_step_per_seq)
    try:
        from ..hf import HFBackend
    except ModuleNotFoundError as e:
        raise ModuleNotFoundError(
            f"the HF backend needs {e.name!r}: install it with `pip install 'llm-batcher[hf]'` "
            "(or pass --model fake)"
        ) from e
    return HFBackend(args.model, dtype=args.dtype, device=args.device)


def progress_bar(**kwargs: Any) -> Any:
    """A tqdm progress bar on stderr (tqdm comes with the ``[server]`` extra)."""
    try:
        from tqdm import tqdm  # type: ignore[import-untyped]
    except ModuleNotFoundError as e:
        raise ModuleNotFoundError(
            "bench and selftest show their progress with tqdm: install it with "
            "`pip install 'llm-batcher[server]'`"
        ) from e
    return tqdm(file=sys.stderr, **kwargs)
