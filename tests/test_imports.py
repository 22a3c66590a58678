"""No module of the package imports in a circle: a circle holds only while its modules are imported in one order and
breaks, half-initialised, on the first import from another end. Imports inside functions count, since they close
the circle at the first call; imports under `if TYPE_CHECKING:` never run and do not."""

from __future__ import annotations

import ast
from pathlib import Path

from conftest import ROOT

PACKAGE = ROOT / "src" / "lightclip"


def package_modules(package: Path) -> dict[str, Path]:
    """{dotted name: file} of every module under `package`; a package is named by its `__init__.py`."""
    modules = {}
    for path in sorted(package.rglob("*.py")):
        parts = list(path.relative_to(package.parent).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        modules[".".join(parts)] = path
    return modules


def _runs(node: ast.AST) -> list[ast.AST]:
    """The nodes right under `node` that can run: all but the body of an `if TYPE_CHECKING:`."""
    children = []
    for child in ast.iter_child_nodes(node):
        test = getattr(child, "test", None)
        if isinstance(child, ast.If) and ast.unparse(test) in ("TYPE_CHECKING", "typing.TYPE_CHECKING"):
            children += child.orelse
        else:
            children.append(child)
    return children


def imported_modules(name: str, path: Path, modules: dict[str, Path]) -> set[str]:
    """The modules of `modules` that the import statements of module `name` (file `path`) initialise, at any depth of
    the file: the module a `from X import y` takes `y` from (`X.y` when that is a module, else `X`) or the one an
    `import X.y` names, and the packages above it, but for those above `name` (initialised before it)."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    targets, pending = set(), [ast.parse(path.read_text(encoding="utf-8"))]
    while pending:
        node = pending.pop()
        pending += _runs(node)
        if isinstance(node, ast.Import):
            targets.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(anchor + ([base] if base else []))
            targets.update(f"{base}.{alias.name}" if f"{base}.{alias.name}" in modules else base
                           for alias in node.names)
    above_name = {name.rsplit(".", depth)[0] for depth in range(name.count(".") + 1)}
    loaded = set()
    for target in targets:
        parts = target.split(".")
        loaded |= {target} | {".".join(parts[:depth]) for depth in range(1, len(parts))} - above_name
    return {module for module in loaded if module in modules and module != name}


def import_graph(package: Path) -> dict[str, set[str]]:
    """{module: the modules of the package it imports} for every module under `package`."""
    modules = package_modules(package)
    return {name: imported_modules(name, path, modules) for name, path in modules.items()}


def circles(graph: dict[str, set[str]]) -> list[tuple[list[str], list[str]]]:
    """Each group of modules that reach one another (a strongly connected component of more than one module, found by
    Tarjan's algorithm), sorted, with one circle through it (the first module repeated at the end)."""
    index, low, stack, on_stack, groups = {}, {}, [], set(), []

    def visit(module: str) -> None:
        index[module] = low[module] = len(index)
        stack.append(module)
        on_stack.add(module)
        for imported in sorted(graph[module]):
            if imported not in index:
                visit(imported)
                low[module] = min(low[module], low[imported])
            elif imported in on_stack:
                low[module] = min(low[module], index[imported])
        if low[module] == index[module]:
            group = set()
            while module not in group:
                group.add(stack.pop())
            on_stack.difference_update(group)
            if len(group) > 1:
                groups.append(group)

    for module in sorted(graph):
        if module not in index:
            visit(module)
    return [(sorted(group), _circle_through(min(group), group, graph)) for group in groups]


def _circle_through(start: str, group: set[str], graph: dict[str, set[str]]) -> list[str]:
    """The shortest path from `start` back to itself inside `group` (breadth first)."""
    paths, seen = [[start]], set()
    while paths:
        path = paths.pop(0)
        for imported in sorted(graph[path[-1]] & group):
            if imported == start:
                return path + [start]
            if imported not in seen:
                seen.add(imported)
                paths.append(path + [imported])
    raise AssertionError(f"no circle through {start}")


def test_no_module_of_the_package_imports_in_a_circle():
    graph = import_graph(PACKAGE)
    assert {"lightclip", "lightclip.data", "lightclip.metrics.ranking"} <= set(graph)
    assert "lightclip.evaluation" in graph["lightclip.shapes"]  # imported inside `evaluate_shapes` only
    found = circles(graph)
    assert not found, "modules that import each other:\n" + "\n".join(
        f"{', '.join(group)} (one circle: {' -> '.join(circle)})" for group, circle in found)


def test_the_graph_sees_function_level_and_package_relative_imports(tmp_path):
    files = {
        "pkg/__init__.py": "from .sub import helper\n",
        "pkg/low.py": "import os\n",
        "pkg/top.py": "def late():\n    from . import sub\n",
        "pkg/sub/__init__.py": "from .helper import helper\n",
        "pkg/sub/helper.py": "from ..top import late\nfrom .. import low\n\ndef helper():\n    pass\n",
        "pkg/typed.py": "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from . import top\n",
    }
    for name, text in files.items():
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_text(text)
    graph = import_graph(tmp_path / "pkg")
    assert graph == {
        "pkg": {"pkg.sub", "pkg.sub.helper"},
        "pkg.low": set(),
        "pkg.top": {"pkg.sub"},
        "pkg.sub": {"pkg.sub.helper"},
        "pkg.sub.helper": {"pkg.top", "pkg.low"},
        "pkg.typed": set(),
    }
    assert circles(graph) == [(["pkg.sub", "pkg.sub.helper", "pkg.top"], ["pkg.sub", "pkg.sub.helper", "pkg.top",
                                                                          "pkg.sub"])]
