"""The rooms of `clipdex.search` import in one direction (README, "Where things live").

Each subpackage (room) and each module at the top of `clipdex.search` is a node; an import
of any kind (at the top of a module, inside a function, or for typing only) is an edge. The
graph must have no cycle, and each room may import only the rooms its docstring allows.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

SEARCH = Path(__file__).resolve().parent.parent / "search"
ROOMS = {"catalog", "index", "encoders", "media", "analysis", "http"}
FACADE = {"library", "searcher", "integrity", "manifest", "__init__"}  # the top: puts the rooms together
# what each room may import besides the foundation modules (errors, atomic, locks, readonly, ...)
ALLOWED = {
    "media": set(),
    "catalog": {"query"},  # the query types (filters)
    "encoders": {"media"},
    "index": {"catalog", "encoders", "media", "query"},
    "analysis": {"catalog", "index", "encoders", "media", "query"} | FACADE,
    "http": {"catalog", "index", "encoders", "media", "analysis", "query"} | FACADE,
}


def node(module: str) -> str:
    parts = module.split(".")
    if len(parts) < 3:
        return "__init__"
    return parts[2]


def import_graph() -> dict[str, set[str]]:
    graph: dict[str, set[str]] = {}
    for path in SEARCH.rglob("*.py"):
        relative = path.relative_to(SEARCH).with_suffix("")
        if relative.parts[0] == "package_root":
            continue
        source = relative.parts[0] if len(relative.parts) > 1 else relative.parts[0]
        for statement in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(statement, ast.ImportFrom) and statement.module:
                if statement.module == "clipdex.search":
                    targets = [f"clipdex.search.{alias.name}" for alias in statement.names]
                else:
                    targets = [statement.module]
            elif isinstance(statement, ast.Import):
                targets = [alias.name for alias in statement.names]
            else:
                continue
            for target in targets:
                if target.startswith("clipdex.search.") or target == "clipdex.search":
                    graph.setdefault(source, set()).add(node(target))
    for source in graph:
        graph[source].discard(source)
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}  # 1: on the path, 2: done
    path: list[str] = []

    def visit(name: str) -> list[str] | None:
        state[name] = 1
        path.append(name)
        for target in sorted(graph.get(name, ())):
            if state.get(target) == 1:
                return path[path.index(target):] + [target]
            if target not in state and (cycle := visit(target)):
                return cycle
        path.pop()
        state[name] = 2
        return None

    for name in sorted(graph):
        if name not in state and (cycle := visit(name)):
            return cycle
    return None


def test_no_import_cycle_between_rooms_or_top_modules() -> None:
    assert find_cycle(import_graph()) is None


def test_the_cycle_finder_finds_one() -> None:
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]


@pytest.mark.parametrize("room", sorted(ALLOWED))
def test_each_room_imports_only_below_it(room: str) -> None:
    foundation = {name.stem for name in SEARCH.glob("*.py")} - FACADE - {"query"}
    imported = import_graph().get(room, set())
    assert imported - foundation - ALLOWED[room] == set()


def test_every_room_says_what_it_owns() -> None:
    for room in ROOMS:
        docstring = ast.get_docstring(ast.parse((SEARCH / room / "__init__.py").read_text()))
        assert docstring and "import" in docstring, room
