"""The package layout is the architecture: imports run one way down the layers, with no circles.

Layers, top to bottom (docs/architecture.md): the front-ends ``cli`` and
``testing`` -> ``service`` -> ``pipeline`` -> ``routing`` / ``builtin`` ->
``model`` / ``ngff`` / ``catalog`` -> the shared top level (``hookspecs``,
``types``, ``errors``, ``config``, ``plugins``). A module may import its own
package and the layers below it, never a layer above it nor a sibling of
its own rank. Imports inside functions count too.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

import cellseg1d

PACKAGE = Path(cellseg1d.__file__).parent
#: Top-level names and their rank; a higher rank may import a lower one.
RANK = {
    "": 0,  # the shared top level: cellseg1d, hookspecs, types, errors, config, plugins
    "model": 1, "ngff": 1, "catalog": 1,
    "routing": 2, "builtin": 2,
    "pipeline": 3,
    "service": 4,
    "testing": 5,
    "cli": 6,
}
TOP_LEVEL = {"__init__", "_moved", "hookspecs", "types", "errors", "config", "plugins"}


def module_name(path: Path) -> str:
    parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def layer_of(module: str) -> str:
    """The layer of a ``cellseg1d...`` module name ("" for the shared top level)."""
    parts = module.split(".")
    if len(parts) == 1:
        return ""
    head = parts[1]
    if head == "__main__":  # python -m cellseg1d: the command
        return "cli"
    if head in TOP_LEVEL:
        return ""
    if head not in RANK:
        raise AssertionError(f"{module}: cellseg1d/{head} is in no layer; add it to RANK and docs/architecture.md")
    return head


def imports(path: Path) -> list[tuple[int, str, bool]]:
    """(line, imported cellseg1d module, at module scope) for every import in ``path``."""
    return imports_in(path.read_text(encoding="utf-8"), module_name(path), path.name == "__init__.py")


def imports_in(source: str, this: str, is_package: bool) -> list[tuple[int, str, bool]]:
    """:func:`imports` of the text of module ``this``."""
    tree = ast.parse(source)
    scoped: set[int] = set()
    for node in ast.walk(tree):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            scoped |= {id(n) for n in ast.walk(node)} - {id(node)}
    found = []
    package = this if is_package else this.rpartition(".")[0]
    for node in ast.walk(tree):
        names: list[str] = []
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                base = ".".join(package.split(".")[: len(package.split(".")) - node.level + 1] + ([base] if base else []))
            # "from cellseg1d.x import y" may name a module y; count the deeper one when it is a file
            names = [f"{base}.{a.name}" if _is_module(f"{base}.{a.name}") else base for a in node.names]
        for name in names:
            if name == "cellseg1d" or name.startswith("cellseg1d."):
                found.append((node.lineno, name, id(node) not in scoped))
    return found


def _is_module(name: str) -> bool:
    rel = Path(*name.split(".")[1:]) if "." in name else Path()
    return (PACKAGE / rel).with_suffix(".py").is_file() or (PACKAGE / rel / "__init__.py").is_file()


def sources() -> list[Path]:
    return sorted(p for p in PACKAGE.rglob("*.py") if "migrations" not in p.parts)


def test_every_module_is_in_a_layer() -> None:
    for path in sources():
        layer_of(module_name(path))


def against_the_layers(importer: str, found: list[tuple[int, str, bool]]) -> list[str]:
    """What ``importer`` imports from a layer above it or beside it."""
    mine = layer_of(importer)
    wrong = []
    for line, imported, _ in found:
        theirs = layer_of(imported)
        if theirs != mine and RANK[theirs] >= RANK[mine]:
            where = "above" if RANK[theirs] > RANK[mine] else "beside"
            wrong.append(f"line {line}: {importer} ({mine or 'top level'}) imports {imported}, a layer {where} "
                         f"it ({theirs or 'top level'})")
    return wrong


def test_imports_run_one_way_down_the_layers() -> None:
    wrong = [w for path in sources() for w in against_the_layers(module_name(path), imports(path))]
    assert not wrong, "imports against the layers:\n" + "\n".join(wrong)


def test_no_import_circles_at_module_scope() -> None:
    graph: dict[str, set[str]] = {}
    for path in sources():
        graph[module_name(path)] = {name for _, name, top in imports(path) if top and name != module_name(path)}
    cycles = _cycles(graph)
    assert not cycles, "modules importing each other at module scope:\n" + "\n".join(" -> ".join(c) for c in cycles)


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan, iterative)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []
    counter = 0
    for start in graph:
        if start in index:
            continue
        work = [(start, iter(sorted(graph.get(start, ()))))]
        index[start] = low[start] = counter
        counter += 1
        stack.append(start)
        on_stack.add(start)
        while work:
            node, children = work[-1]
            child = next(children, None)
            if child is not None:
                if child not in graph:
                    continue
                if child not in index:
                    index[child] = low[child] = counter
                    counter += 1
                    stack.append(child)
                    on_stack.add(child)
                    work.append((child, iter(sorted(graph[child]))))
                elif child in on_stack:
                    low[node] = min(low[node], index[child])
                continue
            work.pop()
            if work:
                low[work[-1][0]] = min(low[work[-1][0]], low[node])
            if low[node] == index[node]:
                component = []
                while True:
                    top = stack.pop()
                    on_stack.discard(top)
                    component.append(top)
                    if top == node:
                        break
                if len(component) > 1:
                    found.append(sorted(component))
    return found


def test_the_check_catches_an_upward_import() -> None:
    """The rules themselves can fail: upward, sideways and lazy imports and a circle are reported."""
    source = ("from cellseg1d.errors import CellsegError\nfrom cellseg1d.model import sam\n"
              "from cellseg1d.ngff.reader import open_image\n\n\ndef f():\n    from cellseg1d.service.daemon import Daemon\n")
    wrong = against_the_layers("cellseg1d.model.new", imports_in(source, "cellseg1d.model.new", False))
    assert [w.split(":")[0] for w in wrong] == ["line 3", "line 7"]
    assert "a layer beside it (ngff)" in wrong[0] and "a layer above it (service)" in wrong[1]
    relative = imports_in("from ..catalog import jobs\n", "cellseg1d.model.new", False)
    assert against_the_layers("cellseg1d.model.new", relative)  # relative imports resolve too
    assert _cycles({"a": {"b"}, "b": {"a"}, "c": {"a"}}) == [["a", "b"]]
    with pytest.raises(AssertionError, match="in no layer"):
        layer_of("cellseg1d.somewhere.new")
