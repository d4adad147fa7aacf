"""The package's import graph has no cycles, at two granularities.

* Modules: every ``import`` anywhere in a module counts, lazy ones inside functions included (a lazy import
  hides a cycle until the function runs), except those under ``if TYPE_CHECKING:`` (never executed) and
  ``if __name__ == "__main__":`` (a script's entry point).
* Parts: each subpackage (``estimators``, ``memory``, ``models``, ``rewards``, ``sampling``, ``world``) and
  each top-level module is one node; a part may not reach itself through another (``world`` using
  ``rewards`` while ``rewards`` uses ``world`` is a cycle even when no single module closes it).

The graph is read from the source with ``ast``, so the test sees every import, not only those one run of the
code happens to execute.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

import rlr_lightning

PACKAGE = Path(rlr_lightning.__file__).parent
ROOT = "rlr_lightning"


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {module_name(p): p for p in PACKAGE.rglob("*.py")}


def _never_imported(node: ast.If) -> bool:
    """``if TYPE_CHECKING:`` (never executed) and ``if __name__ == "__main__":`` (runs only as a script, when
    the module is ``__main__``, not the module other modules import)."""
    test = node.test
    if (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
    ):
        return True
    return (
        isinstance(test, ast.Compare)
        and isinstance(test.left, ast.Name)
        and test.left.id == "__name__"
        and any(isinstance(c, ast.Constant) and c.value == "__main__" for c in test.comparators)
    )


def _imports(tree: ast.AST, name: str, is_package: bool):
    """The project modules ``tree`` imports, TYPE_CHECKING blocks left out."""
    for node in ast.iter_child_nodes(tree):
        if isinstance(node, ast.If) and _never_imported(node):
            yield from (m for child in node.orelse for m in _imports(child, name, is_package))
            continue
        if isinstance(node, ast.Import):
            yield from (alias.name for alias in node.names if alias.name.startswith(ROOT))
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # relative: resolve against this module's package
                package = name.split(".") if is_package else name.split(".")[:-1]
                package = package[: len(package) - node.level + 1]
                base = ".".join(package + ([base] if base else []))
            if not base.startswith(ROOT):
                continue
            for alias in node.names:
                # ``from pkg import submodule`` imports the submodule; ``from pkg import name`` the package.
                yield f"{base}.{alias.name}" if f"{base}.{alias.name}" in MODULES else base
        yield from _imports(node, name, is_package)


def module_graph() -> dict[str, set[str]]:
    graph = {}
    for name, path in MODULES.items():
        tree = ast.parse(path.read_text(), filename=str(path))
        targets = set(_imports(tree, name, path.name == "__init__.py"))
        graph[name] = {t for t in targets if t in MODULES and t != name}
    return graph


def part(name: str) -> str:
    """The part a module belongs to: ``rlr_lightning.<subpackage>`` or the top-level module itself."""
    pieces = name.split(".")
    return ".".join(pieces[:2])


def part_graph(graph: dict[str, set[str]]) -> dict[str, set[str]]:
    parts: dict[str, set[str]] = {}
    for source, targets in graph.items():
        if source == ROOT:  # the package's own __init__ re-exports everything: it is the top, not a part
            continue
        edges = parts.setdefault(part(source), set())
        edges.update(part(t) for t in targets if t != ROOT and part(t) != part(source))
    return parts


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One cycle of ``graph`` as a path ``[a, b, ..., a]``, or ``None``."""
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        path.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                return path[path.index(nxt) :] + [nxt]
            if nxt not in state and (found := visit(nxt)):
                return found
        path.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state and (found := visit(node)):
            return found
    return None


def test_the_graph_is_read_from_every_module():
    graph = module_graph()
    # Lazy (function-level) imports count: the CLI imports the Lightning CLI only inside main().
    assert "rlr_lightning.lightning_cli" in graph["rlr_lightning.cli"]
    assert "rlr_lightning.memory.plan" in graph["rlr_lightning.estimators.base"]
    assert len(graph) == len(MODULES) > 50


def test_find_cycle_finds_one():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": set()}) is None


@pytest.mark.parametrize("granularity", ["modules", "parts"])
def test_no_import_cycles(granularity):
    graph = module_graph()
    if granularity == "parts":
        graph = part_graph(graph)
    cycle = find_cycle(graph)
    assert cycle is None, f"import cycle ({granularity}): {' -> '.join(cycle)}"


def test_the_package_exports_what_users_import():
    import importlib

    exported = set(rlr_lightning.__all__)
    assert {
        "RLRModule",
        "Task",
        "RLR",
        "FullBackprop",
        "TruncatedBackprop",
        "ScoreFunction",
        "GRPO",
        "StableDiffusionBackbone",
        "StableDiffusionXLBackbone",
        "StableDiffusion3Backbone",
        "FluxBackbone",
        "AestheticReward",
        "WeightedSum",
        "WorldCountReward",
    } <= exported
    for name in exported:
        defined = importlib.import_module(rlr_lightning._EXPORTS[name])
        assert getattr(rlr_lightning, name) is getattr(defined, name), name
    with pytest.raises(AttributeError, match="no attribute 'NotAName'"):
        rlr_lightning.NotAName  # noqa: B018
