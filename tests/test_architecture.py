"""The package's shape: no import cycles, between modules or between layers, and no file over 400 lines.

The import graph is read from the source with `ast`: imports at module level and inside functions
alike (a function-level import is a dependency too, only a later one). Not counted: imports under
`if TYPE_CHECKING:` (never executed: they name types for annotations) and a package `__init__`'s
imports of its own modules (re-exports). `from kdlab.x import name` is an edge to `kdlab.x.name`
when that is a module, else to the module of `kdlab.x` that `name` is re-exported from, else to
`kdlab.x` itself.
"""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "kdlab"
MAX_LINES = 400

# Known offenders: none. Each list must stay empty; an entry that no longer offends fails the test,
# so that an exception never outlives its reason.
ALLOWED_IN_MODULE_CYCLES: set[str] = set()
ALLOWED_IN_LAYER_CYCLES: set[str] = set()
ALLOWED_LONG_FILES: set[str] = set()


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _is_type_checking(node: ast.If) -> bool:
    test = node.test
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or \
        (isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")


def _imports(tree: ast.AST) -> list[tuple[str, str | None]]:
    """(module, name) of every executed import in a module: (module, None) for `import module`."""
    found: list[tuple[str, str | None]] = []

    def visit(node: ast.AST) -> None:
        if isinstance(node, ast.If) and _is_type_checking(node):
            for child in node.orelse:
                visit(child)
            return
        if isinstance(node, ast.Import):
            found.extend((alias.name, None) for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.extend((node.module, alias.name) for alias in node.names)
        elif isinstance(node, ast.Call) and getattr(node.func, "attr", getattr(node.func, "id", "")) == \
                "import_module" and node.args and isinstance(node.args[0], ast.Constant) and \
                isinstance(node.args[0].value, str):
            found.append((node.args[0].value, None))
        for child in ast.iter_child_nodes(node):
            visit(child)

    visit(tree)
    return found


def import_graph() -> dict[str, set[str]]:
    """kdlab's modules, each with the kdlab modules it imports (see the module's docstring)."""
    files = {_module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}
    packages = {name for name, path in files.items() if path.name == "__init__.py"}
    imports = {name: _imports(ast.parse(path.read_text(), str(path))) for name, path in files.items()}
    reexported = {(pkg, name): module for pkg in packages for module, name in imports[pkg]
                  if name and module.startswith(pkg + ".") and module in files}

    def target(module: str, name: str | None) -> str | None:
        if module not in files:
            return None
        if name and f"{module}.{name}" in files:
            return f"{module}.{name}"
        return reexported.get((module, name), module)

    graph: dict[str, set[str]] = {}
    for module in files:
        edges = {target(m, n) for m, n in imports[module]}
        graph[module] = {t for t in edges if t and t != module and t != "kdlab"
                         and not (module in packages and t.startswith(module + "."))}
    return graph


def _layers(graph: dict[str, set[str]]) -> dict[str, set[str]]:
    """The graph between kdlab's layers: each subpackage one node, each top-level module one node."""
    def layer(module: str) -> str:
        return ".".join(module.split(".")[:2])

    out: dict[str, set[str]] = {}
    for module, edges in graph.items():
        out.setdefault(layer(module), set()).update(layer(t) for t in edges if layer(t) != layer(module))
    return out


def cycles(graph: dict[str, set[str]]) -> list[tuple[set[str], list[str]]]:
    """Strongly connected components with more than one node (Tarjan), each with one cycle through it."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[set[str]] = []

    def connect(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph.get(v, ())):
            if w not in index:
                connect(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = set()
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.add(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(component)

    for v in sorted(graph):
        if v not in index:
            connect(v)
    return [(component, _cycle_through(graph, component)) for component in found]


def _cycle_through(graph: dict[str, set[str]], component: set[str]) -> list[str]:
    """One cycle inside a strongly connected component, as a path that returns to its start."""
    start = min(component)
    paths = {start: [start]}
    frontier = [start]
    while frontier:  # breadth first: the shortest way back to the start
        nxt = []
        for v in frontier:
            for w in sorted(graph[v] & component):
                if w == start:
                    return [*paths[v], start]
                if w not in paths:
                    paths[w] = [*paths[v], w]
                    nxt.append(w)
        frontier = nxt
    raise AssertionError("not a strongly connected component")


def _check(found: list[tuple[set[str], list[str]]], allowed: set[str], what: str) -> None:
    new = [(component, cycle) for component, cycle in found if not component <= allowed]
    assert not new, f"import cycles between {what}:\n" + "\n".join(
        f"  {' -> '.join(cycle)}   (all of: {', '.join(sorted(component))})" for component, cycle in new)
    stale = allowed - {m for component, _ in found for m in component}
    assert not stale, f"no longer in a cycle between {what}, remove from the allowlist: {sorted(stale)}"


def test_graph_sees_function_level_imports_and_resolves_reexports():
    graph = import_graph()
    assert "kdlab.models.registry" in graph["kdlab.methods.dml"]  # from kdlab.models import ..., in a function
    assert "kdlab.engine" in graph["kdlab.loop"]
    assert not any(t.startswith("kdlab.methods.") for t in graph["kdlab.methods"])  # re-exports aside
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [({"a", "b", "c"}, ["a", "b", "c", "a"])]


def test_no_import_cycles_between_modules():
    _check(cycles(import_graph()), ALLOWED_IN_MODULE_CYCLES, "modules")


def test_no_import_cycles_between_layers():
    _check(cycles(_layers(import_graph())), ALLOWED_IN_LAYER_CYCLES, "layers (subpackages and top-level modules)")


def test_no_file_over_400_lines():
    lengths = {p.relative_to(PACKAGE.parent).as_posix(): len(p.read_text().splitlines())
               for p in PACKAGE.rglob("*.py")}
    long = {f: n for f, n in sorted(lengths.items()) if n > MAX_LINES}
    offenders = {f: n for f, n in long.items() if f not in ALLOWED_LONG_FILES}
    assert not offenders, f"files over {MAX_LINES} lines: {offenders}"
    stale = ALLOWED_LONG_FILES - set(long)
    assert not stale, f"no longer over {MAX_LINES} lines, remove from the allowlist: {sorted(stale)}"
