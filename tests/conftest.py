"""Fixtures for every test folder: scripts of ``benchmarks/`` and ``examples/`` imported as modules."""

from __future__ import annotations

import ast
import importlib.util
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="session")
def load_script():
    """``load_script("benchmarks/compare_runs.py")``: the script as a module (those folders are not packages)."""

    def load(relative: str):
        name = "script_" + Path(relative).stem
        if name not in sys.modules:
            spec = importlib.util.spec_from_file_location(name, ROOT / relative)
            module = importlib.util.module_from_spec(spec)
            sys.modules[name] = module  # dataclasses resolve annotations through sys.modules
            spec.loader.exec_module(module)
        return sys.modules[name]

    return load


def package_imports(package: Path) -> dict[str, set[str]]:
    """Module -> the sibling modules it imports anywhere in it (functions and TYPE_CHECKING blocks included),
    relative or by the package's own name."""
    graph = {}
    for path in package.glob("*.py"):
        found = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom):
                if node.level == 1:  # from .x import y / from . import x
                    found |= {node.module} if node.module else {a.name for a in node.names}
                elif node.module and node.module.startswith(f"{package.name}."):
                    found.add(node.module.split(".")[1])
            elif isinstance(node, ast.Import):
                found |= {a.name.split(".")[1] for a in node.names if a.name.startswith(f"{package.name}.")}
        graph[path.stem] = {m.split(".")[0] for m in found} - {path.stem}
    return graph


def import_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """The first import cycle of a module graph (``a -> b -> a``), or None."""
    state: dict[str, str] = {}

    def visit(module: str, trail: list[str]) -> list[str] | None:
        state[module] = "open"
        for dep in sorted(graph.get(module, ())):
            if state.get(dep) == "open":
                return trail + [dep]
            if dep not in state and (cycle := visit(dep, trail + [dep])):
                return cycle
        state[module] = "done"
        return None

    return next((c for m in sorted(graph) if m not in state and (c := visit(m, [m]))), None)


@pytest.fixture(scope="session")
def imports_of():
    """``imports_of(package_dir)``: its module import graph, and ``import_cycle`` to look for a cycle in it."""
    return package_imports, import_cycle
