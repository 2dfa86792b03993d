"""The package's layering rule, checked on its imports (README, Design):

config ← {io, compute} ← models ← core ← {mitigate, report} ← pipeline ← experiments ← defs ← definitions ← cli

A module may import its own layer and the layers below it, never one above
and never a sibling layer; no import of the package hides inside a
function; the import graph between modules has no cycle.
"""
from __future__ import annotations

import ast
from functools import lru_cache
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "ravl_pipeline"
RANK = {"config": 0, "io": 1, "compute": 1, "models": 2, "core": 3, "mitigate": 4, "report": 4, "pipeline": 5,
        "experiments": 6, "defs": 7, "definitions": 8, "cli": 9}


def module_name(path: Path) -> str:
    rel = path.relative_to(PACKAGE.parent).with_suffix("")
    parts = rel.parts[:-1] if rel.name == "__init__" else rel.parts
    return ".".join(parts)


MODULES = {module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}


def imported(module: str, node) -> list[str]:
    """Package modules an import statement names (resolved to existing modules)."""
    if isinstance(node, ast.Import):
        names = [a.name for a in node.names]
    else:
        base = node.module or ""
        if node.level:
            parts = module.split(".")
            parts = parts if MODULES[module].name == "__init__.py" else parts[:-1]
            parts = parts[: len(parts) - (node.level - 1)]
            base = ".".join(parts + ([base] if base else []))
        names = [f"{base}.{a.name}" for a in node.names] + [base]
    out = []
    for name in names:
        while name and name not in MODULES:
            name = name.rpartition(".")[0]
        if name.startswith("ravl_pipeline.") and name != module:
            out.append(name)
    return out


def layer(module: str) -> str:
    return module.split(".")[1]


@lru_cache(maxsize=1)
def edges() -> dict[str, set[str]]:
    graph = {}
    for module, path in MODULES.items():
        if module == "ravl_pipeline":
            continue
        tree = ast.parse(path.read_text())
        graph[module] = {t for node in ast.walk(tree) if isinstance(node, (ast.Import, ast.ImportFrom))
                         for t in imported(module, node) if t != "ravl_pipeline"}
    return graph


def test_every_module_sits_in_a_known_layer():
    assert {layer(m) for m in MODULES if m != "ravl_pipeline"} <= set(RANK)


@pytest.mark.parametrize("module", sorted(m for m in MODULES if m != "ravl_pipeline"))
def test_no_module_imports_upward_or_sideways(module):
    own = layer(module)
    wrong = [t for t in edges()[module]
             if layer(t) != own and (RANK[layer(t)] > RANK[own] or RANK[layer(t)] == RANK[own])]
    assert not wrong, f"{module} imports {wrong}, a layer not below {own}"


def test_no_package_import_inside_a_function():
    hidden = []
    for module, path in MODULES.items():
        for fn in ast.walk(ast.parse(path.read_text())):
            if isinstance(fn, (ast.FunctionDef, ast.AsyncFunctionDef)):
                hidden += [f"{module}.{fn.name}" for node in ast.walk(fn)
                           if isinstance(node, (ast.Import, ast.ImportFrom)) and imported(module, node)]
    assert not hidden, f"function-level imports of the package: {hidden}"


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import cycle of ``graph`` as a path (first module repeated at the end), or None."""
    state: dict[str, int] = {}

    def visit(module, stack):
        state[module] = 1
        for target in sorted(graph.get(module, ())):
            if module.startswith(target + ".") or target.startswith(module + "."):
                continue  # a package and its own submodules re-export each other
            if state.get(target) == 1:
                return stack[stack.index(target):] + [target]
            if not state.get(target):
                found = visit(target, stack + [target])
                if found:
                    return found
        state[module] = 2
        return None

    for module in sorted(graph):
        if not state.get(module):
            found = visit(module, [module])
            if found:
                return found
    return None


def test_the_import_graph_has_no_cycle():
    cycle = find_cycle(edges())
    assert cycle is None, "import cycle: " + " -> ".join(cycle or [])
    # the finder itself sees a cycle through three modules, and not a package re-exporting its submodule
    assert find_cycle({"a.x": {"a.y"}, "a.y": {"b"}, "b": {"a.x"}}) == ["a.x", "a.y", "b", "a.x"]
    assert find_cycle({"a": {"a.x"}, "a.x": {"a"}}) is None


def test_the_checker_sees_an_upward_import():
    """The rule is not vacuous: a core module importing the pipeline is caught."""
    tree = ast.parse("from ..pipeline import stages\n")
    assert {layer(t) for t in imported("ravl_pipeline.core.scores", tree.body[0])} == {"pipeline"}
