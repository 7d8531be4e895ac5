"""The public face: exactly the pinned names, and no heavy imports or side effects on import."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path
from types import ModuleType

import pytest

import batcher
import batcher.backend
import batcher.testing

#: The public API. A change here is a change for users: say it in CHANGELOG.md.
PUBLIC: dict[ModuleType, list[str]] = {
    batcher: [
        "BatchConfig",
        "Batcher",
        "BatcherClosed",
        "BatcherError",
        "BatcherStats",
        "Chunk",
        "Completion",
        "DeadlineExceeded",
        "GenerationOptions",
        "InvalidRequest",
        "Overloaded",
        "Prompt",
        "PromptTooLong",
        "RequestFailed",
        "TokenIds",
        "TokenStream",
        "Usage",
    ],
    batcher.backend: [
        "BatchFunction",
        "FinishReason",
        "GenerationBackend",
        "Logprobs",
        "NewSequence",
        "PrefixCache",
        "PrefixStats",
        "PrepareRequest",
        "PreparedPrompt",
        "ResponseFormat",
        "SamplingParams",
        "SeqOutput",
        "StepResult",
        "StopMatcher",
        "TokenLogprob",
    ],
    batcher.testing: ["FakeBackend"],
}
EXAMPLES = Path(__file__).parents[2] / "examples"


@pytest.mark.parametrize("module", PUBLIC, ids=lambda m: m.__name__)
def test_all_is_pinned_and_complete(module: ModuleType) -> None:
    assert module.__all__ == PUBLIC[module]
    assert module.__all__ == sorted(module.__all__)
    # Every public attribute is listed (submodules aside: batcher.backend appears on batcher once
    # imported), and every listed name exists.
    public = {n for n, v in vars(module).items() if not n.startswith("_") and not isinstance(v, ModuleType)}
    assert public == set(module.__all__)
    for name in module.__all__:
        obj = getattr(module, name)
        if isinstance(obj, type):  # type aliases (Prompt, BatchFunction...) have no module of their own
            assert obj.__module__.startswith("batcher._"), name  # defined in a private core module


def test_the_public_api_stays_small() -> None:
    assert len(batcher.__all__) <= 17


def test_examples_use_only_public_core_names() -> None:
    found = 0
    for path in EXAMPLES.glob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] == "batcher":
                found += 1
                assert not node.module.startswith("batcher._"), (path.name, node.module)
                module = {m.__name__: m for m in PUBLIC}.get(node.module)
                if module is not None:
                    names = [a.name for a in node.names]
                    assert set(names) <= set(PUBLIC[module]), (path.name, node.module, names)
            elif isinstance(node, ast.Import):
                assert not any(a.name.startswith("batcher._") for a in node.names), path.name
    assert found >= 3, "the examples were not read"


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
