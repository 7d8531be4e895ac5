"""Model backends and framework glue for llm-batcher (installed as ``batcher.adapters``).

Layout (dependencies point to ``batcher``, never back):
    hf/          HFBackend: continuous batching for Hugging Face causal LMs (the [hf] extra)
    server/      the OpenAI-compatible ASGI app (the [server] extra)
    ray/         replicas on Ray Serve: ``llm-batcher serve --replicas N`` (the [ray] extra)
    tools/       ``llm-batcher bench`` and ``llm-batcher selftest``
    _cli         the ``llm-batcher`` console script (``main``)

Heavy dependencies load on first use of a name, never on ``import batcher.adapters``.
"""

from __future__ import annotations

from importlib import import_module
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from ._cli import main
    from .hf import HFBackend
    from .server import create_app

__all__ = ["HFBackend", "create_app", "main"]

_WHERE = {"HFBackend": (".hf", "hf"), "create_app": (".server", "server"), "main": ("._cli", "server")}


def __getattr__(name: str) -> Any:
    if name not in _WHERE:
        raise AttributeError(f"module 'batcher.adapters' has no attribute {name!r}")
    module, extra = _WHERE[name]
    try:
        value = getattr(import_module(module, __name__), name)
    except ModuleNotFoundError as e:
        raise ModuleNotFoundError(
            f"batcher.adapters.{name} needs {e.name!r}: install it with "
            f"`pip install 'llm-batcher[{extra}]'` (install torch first where you want a CPU-only build)"
        ) from e
    globals()[name] = value
    return value
