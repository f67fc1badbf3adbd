"""The package layering is a rule, checked from the imports in the source.

gmr_models <- pipeline <- training <- benchmarks <- gmrpath: a package may import only those
before it (and itself); no import cycle between modules; no library module over 450 lines.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

from conftest import REPO

LAYERS = ["gmr_models", "pipeline", "training", "benchmarks", "gmrpath"]


def _modules() -> dict[str, Path]:
    out = {}
    for pkg in LAYERS:
        for path in (REPO / pkg).rglob("*.py"):
            parts = path.relative_to(REPO).with_suffix("").parts
            out[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return out


def _imports(name: str, path: Path) -> set[str]:
    """Every project module ``name`` imports, at module level or inside functions."""
    is_pkg = path.name == "__init__.py"
    base = name.split(".") if is_pkg else name.split(".")[:-1]
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom):
            mod = ".".join(base[: len(base) - node.level + 1] + ([node.module] if node.module else [])) if node.level else node.module
            found.add(mod)
            found |= {f"{mod}.{a.name}" for a in node.names}
    return {m for m in found if m and m.split(".")[0] in LAYERS}


MODULES = _modules()
GRAPH = {name: {m for m in _imports(name, path) if m in MODULES and m != name} for name, path in MODULES.items()}


@pytest.mark.parametrize("pkg", LAYERS)
def test_packages_import_only_the_layers_below(pkg):
    allowed = set(LAYERS[: LAYERS.index(pkg) + 1])
    bad = sorted(f"{name} imports {m}" for name, deps in GRAPH.items() if name.split(".")[0] == pkg
                 for m in deps if m.split(".")[0] not in allowed)
    assert not bad, bad


def test_no_import_cycle_between_modules():
    state: dict[str, int] = {}

    def visit(node, stack):
        state[node] = 1
        for dep in GRAPH[node]:
            if state.get(dep) == 1:
                # a package importing its own submodule (``from .x import``) is not a cycle
                cycle = stack[stack.index(dep):] + [dep] if dep in stack else [node, dep]
                if not all(a.startswith(b + ".") or b.startswith(a + ".") for a, b in zip(cycle, cycle[1:])):
                    raise AssertionError(" -> ".join(cycle))
            elif dep not in state:
                visit(dep, stack + [dep])
        state[node] = 2

    for name in sorted(GRAPH):
        if name not in state:
            visit(name, [name])


def test_the_checker_sees_a_cycle_and_an_upward_import(tmp_path):
    a = tmp_path / "a.py"
    a.write_text("from benchmarks.common import write_json\nfrom . import b\n")
    assert "benchmarks.common" in _imports("pipeline.a", a) and "pipeline.b" in _imports("pipeline.a", a)


def test_library_modules_stay_small():
    long = sorted(f"{p.relative_to(REPO)}: {n}" for p in MODULES.values() if (n := len(p.read_text().splitlines())) > 450)
    assert not long, long
