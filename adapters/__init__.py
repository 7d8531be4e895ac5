"""Model backends and framework glue for llm-batcher (installed as ``batcher.adapters``).

Layout:
    _hf          HFBackend: continuous batching for Hugging Face causal LMs (needs the [hf] extra)
    _server      the OpenAI-compatible ASGI app (needs the [server] extra)
    _cli         the ``llm-batcher`` console script

Heavy dependencies load on first use of a name, never on ``import batcher.adapters``.
"""
