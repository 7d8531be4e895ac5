"""HFBackend: continuous batching for Hugging Face causal LMs, CPU or CUDA (the ``[hf]`` extra).

Layout: ``_backend`` the backend (the four verbs); ``_attention`` the packed call's plan and
attention; ``_cache`` the KV slab; ``_prefix`` reuse of the chat template's prefix; ``_rows``
per-sequence state; ``_sampling``; ``_detok`` incremental detokenization; ``_cpu_linear`` CPU linear
layers on prepacked oneDNN weights; ``_load`` finding, converting and describing models; ``_threads``
the OpenMP wait policy, applied here, before torch loads.
"""

from ._threads import apply_default_wait_policy

apply_default_wait_policy()

from ._backend import HFBackend  # noqa: E402

__all__ = ["HFBackend"]
