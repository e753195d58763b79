"""The import graph of the spool and the worker: data flows one way.

Every import counts, also those inside functions or under ``TYPE_CHECKING``
(the module's whole syntax tree is read, not only its top level): an import
circle hidden in a function is still a circle.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pymta

ROOT = Path(pymta.__file__).parent


def module_name(path: Path) -> str:
    parts = path.relative_to(ROOT.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def modules_under(package: str) -> dict[str, Path]:
    folder = ROOT.parent.joinpath(*package.split("."))
    return {module_name(path): path for path in sorted(folder.rglob("*.py"))}


def imports_of(path: Path) -> set[str]:
    """Every module ``path`` imports, anywhere in it (``from P import name`` counts
    as ``P.name`` when that is a module, else as ``P``)."""
    name = module_name(path)
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[:len(base) - node.level + 1]
                source = ".".join(base + ([node.module] if node.module else []))
            else:
                source = node.module
            for alias in node.names:
                candidate = f"{source}.{alias.name}"
                is_module = (ROOT.parent.joinpath(*candidate.split(".")).with_suffix(".py").exists()
                             or ROOT.parent.joinpath(*candidate.split("."), "__init__.py").exists())
                found.add(candidate if is_module else source)
    found.discard(name)
    return found


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import circle among the graph's modules, or None."""
    state: dict[str, int] = {}          # 1: on the current path, 2: done
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        path.append(node)
        for target in sorted(graph[node]):
            if target not in graph:
                continue
            if state.get(target) == 1:
                return path[path.index(target):] + [target]
            if target not in state:
                cycle = visit(target)
                if cycle:
                    return cycle
        path.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state:
            cycle = visit(node)
            if cycle:
                return cycle
    return None


def test_the_spool_has_no_import_circle():
    graph = {name: imports_of(path) for name, path in modules_under("pymta.spool").items()}
    assert "pymta.spool.store" in graph and "pymta.spool.disk" in graph
    assert find_cycle(graph) is None, " -> ".join(find_cycle(graph))


def test_the_file_side_does_not_import_the_reactor_side():
    """queuefile (the format) and disk (the file side) never reach up into the Spool or its writer."""
    for name in ("pymta.spool.queuefile", "pymta.spool.disk", "pymta.spool.message",
                 "pymta.spool.recovery", "pymta.spool.worker_calls"):
        imported = imports_of(modules_under("pymta.spool")[name])
        assert not imported & {"pymta.spool.store", "pymta.spool.writer", "pymta.spool",
                               "twisted.internet.defer", "twisted.internet"}, (name, imported)


def test_the_worker_knows_neither_spool_nor_delivery():
    for name, path in modules_under("pymta.worker").items():
        for imported in imports_of(path):
            assert not imported.startswith(("pymta.spool", "pymta.delivery")), (name, imported)


def test_the_cycle_finder_sees_a_circle_hidden_in_a_function(tmp_path):
    """(The check above would see an import inside a function: it reads the whole tree.)"""
    source = "def later():\n    from pymta.spool.store import Spool\n"
    tree = ast.parse(source)
    assert any(isinstance(node, ast.ImportFrom) for node in ast.walk(tree))
    assert find_cycle({"a": {"b"}, "b": {"a"}}) == ["a", "b", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None


def test_nothing_below_delivery_imports_it_back():
    """Delivery builds on the spool and the worker; neither reaches up into delivery
    (the worker runs delivery's calls by name, never by import)."""
    for package in ("pymta.spool", "pymta.worker"):
        for name, path in modules_under(package).items():
            for imported in imports_of(path):
                assert not imported.startswith("pymta.delivery"), (name, imported)
