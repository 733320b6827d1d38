"""The package's modules import each other without a circle (ARCHITECTURE.md: data flows forward,
no import cycles). Imports are read from the source with `ast`, those inside functions and under
`if TYPE_CHECKING` included: a lazy import hides a circle from Python, not from the design."""

from __future__ import annotations

import ast
import importlib.util
import pkgutil

import minigpt


def package_modules() -> dict[str, str]:
    """Every module of minigpt (packages as their __init__), by name: its source file."""
    modules = {"minigpt": minigpt.__file__}
    for info in pkgutil.walk_packages(minigpt.__path__, prefix="minigpt."):
        modules[info.name] = importlib.util.find_spec(info.name).origin
    return modules


def imported_modules(name: str, path: str, known: set[str]) -> set[str]:
    """The minigpt modules that module `name` (source at `path`) imports anywhere in its body;
    `from package import x` counts as importing the submodule x where there is one."""
    package = name if path.endswith("__init__.py") else name.rpartition(".")[0]
    found = set()
    with open(path, encoding="utf-8") as f:
        tree = ast.parse(f.read(), path)
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # relative: from the package, up level - 1 packages
                parent = package.rsplit(".", node.level - 1)[0] if node.level > 1 else package
                base = f"{parent}.{base}" if base else parent
            for alias in node.names:
                submodule = f"{base}.{alias.name}"
                found.add(submodule if submodule in known else base)
    return {module for module in found if module in known and module != name}


def import_graph() -> dict[str, set[str]]:
    modules = package_modules()
    return {name: imported_modules(name, path, set(modules)) for name, path in modules.items()}


def find_cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """One cycle (a, b, ..., a) through every strongly connected group of modules."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    groups: list[set[str]] = []

    def connect(node: str) -> None:  # Tarjan's algorithm
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for nxt in sorted(graph.get(node, ())):
            if nxt not in index:
                connect(nxt)
                low[node] = min(low[node], low[nxt])
            elif nxt in on_stack:
                low[node] = min(low[node], index[nxt])
        if low[node] == index[node]:
            group = set()
            while True:
                member = stack.pop()
                on_stack.discard(member)
                group.add(member)
                if member == node:
                    break
            if len(group) > 1:
                groups.append(group)

    for node in sorted(graph):
        if node not in index:
            connect(node)
    return [_cycle_in(graph, group) for group in groups]


def _cycle_in(graph: dict[str, set[str]], group: set[str]) -> list[str]:
    """A shortest path from the group's first module back to itself, inside the group."""
    start = min(group)
    paths = {start: [start]}
    frontier = [start]
    while frontier:
        following = []
        for node in frontier:
            for nxt in sorted(graph[node] & group):
                if nxt == start:
                    return paths[node] + [start]
                if nxt not in paths:
                    paths[nxt] = paths[node] + [nxt]
                    following.append(nxt)
        frontier = following
    raise AssertionError(f"{sorted(group)} is not strongly connected")


def test_find_cycles_names_each_circle():
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a", "d"}, "d": set(), "e": {"f"}, "f": {"e"}}
    assert find_cycles(graph) == [["a", "b", "c", "a"], ["e", "f", "e"]]
    assert find_cycles({"a": {"b"}, "b": {"c"}, "c": set()}) == []


def test_imports_inside_functions_and_relative_ones_count(tmp_path):
    source = tmp_path / "mod.py"
    source.write_text(
        "import os\nfrom . import sibling\nfrom .. import model\n"
        "def f():\n    from minigpt.model import GPT\n    import minigpt.engine\n"
    )
    known = {"minigpt", "minigpt.model", "minigpt.engine", "minigpt.evals.sibling"}
    found = imported_modules("minigpt.evals.mod", str(source), known)
    assert found == {"minigpt.model", "minigpt.engine", "minigpt.evals.sibling"}


def test_the_package_has_no_import_cycles():
    graph = import_graph()
    assert {"minigpt.model", "minigpt.engine", "minigpt.interop.hf"} <= set(graph)
    assert "minigpt.model" in graph["minigpt.engine"]  # the walk sees imports at all
    cycles = [" -> ".join(cycle) for cycle in find_cycles(graph)]
    assert not cycles, "import cycles between minigpt modules:\n" + "\n".join(cycles)
