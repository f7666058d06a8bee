"""The project's modules form no import cycle.

The graph is read from the source (ast), so it sees every import: at module level and inside functions
(a deferred import hides a cycle from Python, not from the design). Relative imports are resolved;
`from package import name` imports the submodule when `name` is one; importing `a.b.c` also runs the
`__init__` of `a.b` (and its re-exports) unless the importer lives inside `a.b` already. Imports under
`if TYPE_CHECKING:` never run and are left out.
"""

from __future__ import annotations

import ast
from pathlib import Path

import subjectops

SRC = Path(subjectops.__file__).resolve().parent


def module_name(path: Path) -> str:
    parts = path.relative_to(SRC.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def modules() -> dict[str, Path]:
    return {module_name(p): p for p in sorted(SRC.rglob("*.py"))}


def _type_checking_only(tree: ast.AST) -> set[int]:
    """ids of import nodes inside `if TYPE_CHECKING:` blocks."""
    skip = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and getattr(node.test, "id", getattr(node.test, "attr", None)) == "TYPE_CHECKING":
            skip |= {id(n) for stmt in node.body for n in ast.walk(stmt)}
    return skip


def imported_modules(name: str, path: Path, known: set[str]) -> set[str]:
    """The project modules that importing (or running any function of) `name` imports."""
    tree = ast.parse(path.read_text(), str(path))
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    skip = _type_checking_only(tree)
    targets: set[str] = set()
    for node in ast.walk(tree):
        if id(node) in skip:
            continue
        if isinstance(node, ast.Import):
            targets |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                source = ".".join(base + ([node.module] if node.module else []))
            else:
                source = node.module or ""
            targets.add(source)
            targets |= {f"{source}.{alias.name}" for alias in node.names if f"{source}.{alias.name}" in known}
    root = name.split(".")[0]
    out = set()
    for target in targets:
        if target.split(".")[0] != root:
            continue
        parts = target.split(".")
        for i in range(2, len(parts) + 1):  # a.b.c runs a.b's __init__ first, unless we are inside a.b
            mod = ".".join(parts[:i])
            if mod in known and mod != name and not (name + ".").startswith(mod + "."):
                out.add(mod)
    return out


def import_graph() -> dict[str, set[str]]:
    mods = modules()
    known = set(mods)
    return {name: imported_modules(name, path, known) for name, path in mods.items()}


def find_cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """One cycle (as a path that returns to its start) per strongly connected component of 2+ modules."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    components: list[list[str]] = []

    def strongconnect(v: str) -> None:  # Tarjan's algorithm
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph.get(v, ())):
            if w not in index:
                strongconnect(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                components.append(sorted(comp))

    for v in sorted(graph):
        if v not in index:
            strongconnect(v)
    return [_cycle_in(graph, comp) for comp in components]


def _cycle_in(graph: dict[str, set[str]], comp: list[str]) -> list[str]:
    """A shortest path from the component's first module back to itself (breadth first)."""
    start, members = comp[0], set(comp)
    came_from: dict[str, str] = {}
    frontier = [start]
    while frontier:
        nxt = []
        for v in frontier:
            if start in graph[v]:
                path = [v]
                while path[-1] != start:
                    path.append(came_from[path[-1]])
                return path[::-1] + [start]
            for w in sorted(graph[v] & members):
                if w not in came_from and w != start:
                    came_from[w] = v
                    nxt.append(w)
        frontier = nxt
    raise AssertionError(f"no cycle through {start} in {comp}")


def test_the_graph_sees_every_kind_of_import(tmp_path):
    """The reader itself: deferred, relative, submodule and re-export imports are edges; TYPE_CHECKING is not."""
    pkg = tmp_path / "pkg"
    (pkg / "sub").mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    (pkg / "sub" / "__init__.py").write_text("from pkg.sub.leaf import thing\n")
    (pkg / "sub" / "leaf.py").write_text("from . import sibling\nthing = 1\n")
    (pkg / "sub" / "sibling.py").write_text("def f():\n    from ..top import x\n")
    (pkg / "top.py").write_text("from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    import pkg.other\n"
                                "from pkg import sub\nx = 1\n")
    (pkg / "other.py").write_text("import pkg.sub.leaf\n")
    known = {"pkg", "pkg.sub", "pkg.sub.leaf", "pkg.sub.sibling", "pkg.top", "pkg.other"}
    assert imported_modules("pkg.sub.leaf", pkg / "sub" / "leaf.py", known) == {"pkg.sub.sibling"}
    assert imported_modules("pkg.sub.sibling", pkg / "sub" / "sibling.py", known) == {"pkg.top"}
    assert imported_modules("pkg.top", pkg / "top.py", known) == {"pkg.sub"}
    assert imported_modules("pkg.other", pkg / "other.py", known) == {"pkg.sub", "pkg.sub.leaf"}
    assert imported_modules("pkg.sub", pkg / "sub" / "__init__.py", known) == {"pkg.sub.leaf"}
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}
    assert find_cycles(graph) == [["a", "b", "c", "a"]]


def test_no_import_cycle_between_project_modules():
    graph = import_graph()
    assert len(graph) > 40 and "subjectops.tracking.gates" in graph["subjectops.tracking.registry"]
    cycles = find_cycles(graph)
    assert not cycles, "import cycles between project modules:\n" + "\n".join(" -> ".join(c) for c in cycles)


# Who may import whom, by layer (subjectops.<layer>): a layer never imports the layers listed against it.
LAYERS_BELOW = {
    "training": ("stages", "cli", "cli_common", "cli_tracking", "tracking"),
    "methods": ("stages", "cli", "cli_common", "cli_tracking", "tracking"),
    "inference": ("stages", "cli", "cli_common", "cli_tracking", "tracking"),
    "tracking": ("stages", "cli", "cli_common", "cli_tracking"),
    "models": ("methods", "training", "inference"),
}


def layer_violations(graph: dict[str, set[str]]) -> list[str]:
    def layer(module: str) -> str:
        return module.split(".")[1] if module.count(".") else ""

    return sorted(f"{mod} imports {dep}" for mod, deps in graph.items() for dep in deps
                  if layer(dep) in LAYERS_BELOW.get(layer(mod), ()))


def test_the_layer_reader_names_a_wrong_way_import():
    graph = {"subjectops.tracking.sync": {"subjectops.stages.register", "subjectops.config"},
             "subjectops.stages.finetune": {"subjectops.methods", "subjectops.tracking.record"}}
    assert layer_violations(graph) == ["subjectops.tracking.sync imports subjectops.stages.register"]


def test_layers_import_only_downwards():
    """Stages may use methods, training, inference, models and data; training, methods and inference never import
    stages, the CLI or tracking; tracking imports no stage and no CLI module; models import no method, training or
    inference."""
    violations = layer_violations(import_graph())
    assert not violations, "imports against the layer order:\n" + "\n".join(violations)
