"""The core's import graph, read with ``ast`` (nothing is imported): no circles, and nothing from
outside the core. Every import counts, inside functions and under ``TYPE_CHECKING`` too: a circle
only the type checker sees is still two modules that cannot be understood one without the other."""

from __future__ import annotations

import ast
from pathlib import Path

import batcher

PACKAGE = Path(batcher.__file__).parent
Graph = dict[str, set[str]]


def module_name(path: Path) -> str:
    return "batcher" if path.name == "__init__.py" else f"batcher.{path.stem}"


def imported(path: Path) -> set[str]:
    """Every module ``path`` imports (absolute names; ``from . import x`` counts ``x`` if it is a
    module of the package, else the package itself)."""
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            assert node.level <= 1, f"{path.name} imports from outside the package: {ast.unparse(node)}"
            if node.level == 0:
                found.add(node.module or "")
            elif node.module is not None:
                found.add(f"batcher.{node.module}")
            else:
                for alias in node.names:
                    is_module = (PACKAGE / f"{alias.name}.py").exists()
                    found.add(f"batcher.{alias.name}" if is_module else "batcher")
    return found


def core_graph() -> Graph:
    """Module → the core modules it imports, for every module of ``batcher/``."""
    modules = {module_name(p): p for p in sorted(PACKAGE.glob("*.py"))}
    return {name: imported(path) & modules.keys() for name, path in modules.items()}


def find_cycle(graph: Graph) -> list[str] | None:
    """One circle of ``graph`` as a path that ends where it starts, or None if it has none."""
    done: set[str] = set()
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        if node in path:
            return [*path[path.index(node) :], node]
        if node in done:
            return None
        path.append(node)
        for target in sorted(graph.get(node, ())):
            if (cycle := visit(target)) is not None:
                return cycle
        path.pop()
        done.add(node)
        return None

    for start in sorted(graph):
        if (cycle := visit(start)) is not None:
            return cycle
    return None


def test_the_core_has_no_import_circle() -> None:
    graph = core_graph()
    assert len(graph) > 10 and graph["batcher._batcher"], "the graph was not read"
    cycle = find_cycle(graph)
    assert cycle is None, "import circle: " + " -> ".join(cycle or [])


def test_a_circle_added_to_the_real_graph_is_found() -> None:
    """The check is not vacuous: one import back from a leaf module closes a circle it reports."""
    graph = core_graph()
    assert "batcher._types" in graph["batcher._request"]
    graph["batcher._types"] = graph["batcher._types"] | {"batcher._request"}
    cycle = find_cycle(graph)
    assert cycle is not None and cycle[0] == cycle[-1]
    assert {"batcher._request", "batcher._types"} <= set(cycle)
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b", "c"}, "b": {"c"}, "c": set()}) is None


def test_the_core_never_imports_torch_or_the_adapters() -> None:
    for path in PACKAGE.glob("*.py"):
        for name in imported(path):
            top = name.split(".")[0]
            assert top not in {"torch", "transformers", "adapters"}, (path.name, name)
            assert not name.startswith("batcher.adapters"), (path.name, name)


def layout() -> dict[str, int]:
    """Module → its line in the layout comment of ``batcher/__init__.py``."""
    rows: dict[str, int] = {}
    for i, line in enumerate((batcher.__doc__ or "").splitlines()):
        if line.startswith("    _"):
            names = line.strip().split("  ")[0]  # "_config, _types, _errors   configuration..."
            rows.update({f"batcher.{n.strip()}": i for n in names.split(",")})
    return rows


def test_the_layout_comment_names_every_private_module() -> None:
    rows = layout()
    for path in PACKAGE.glob("_[!_]*.py"):
        assert module_name(path) in rows, f"the layout comment in batcher/__init__.py omits {path.stem}"


def test_imports_point_down_the_layout_comment() -> None:
    """The layout comment reads top-down: a module imports only the modules listed below it."""
    rows = layout()
    for module, targets in core_graph().items():
        for target in targets - {"batcher"}:
            if module in rows and target in rows:
                assert rows[target] >= rows[module], f"{module} imports {target}, listed above it"
