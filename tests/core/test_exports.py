"""The public face: exactly the exported names, and no heavy imports or side effects on import."""

from __future__ import annotations

import subprocess
import sys

import batcher


def test_all_is_sorted_and_complete() -> None:
    assert list(batcher.__all__) == sorted(batcher.__all__)
    # submodules (batcher.adapters, batcher.backend...) appear as attributes once imported
    public = {n for n in dir(batcher) if not n.startswith("_")} - {"adapters", "backend", "testing"}
    # Submodules are private (underscored); every public attribute is in __all__ and vice versa.
    assert public == set(batcher.__all__)
    for name in batcher.__all__:
        obj = getattr(batcher, name)
        if isinstance(obj, type):  # type aliases (Prompt, Outcome...) have no module of their own
            assert obj.__module__.startswith("batcher."), name


def test_import_is_light_and_side_effect_free() -> None:
    code = (
        "import sys, batcher, batcher.adapters;"
        "heavy = [m for m in ('torch', 'transformers', 'prometheus_client', 'fastapi', 'uvicorn')"
        " if m in sys.modules];"
        "print(','.join(heavy))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == ""


def test_adapters_is_not_a_top_level_module() -> None:
    code = "import importlib.util; print(importlib.util.find_spec('adapters'))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd="/")
    assert out.stdout.strip() == "None"


def test_errors_form_one_tree() -> None:
    for name in (
        "InvalidRequest",
        "PromptTooLong",
        "Overloaded",
        "DeadlineExceeded",
        "BatcherClosed",
        "RequestFailed",
    ):
        assert issubclass(getattr(batcher, name), batcher.BatcherError)
    assert issubclass(batcher.InvalidRequest, ValueError)
    assert issubclass(batcher.DeadlineExceeded, TimeoutError)
