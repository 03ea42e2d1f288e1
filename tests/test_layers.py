"""deft is layered: a module never imports one of a higher layer, and deft's modules import each other
without cycles. Checked statically with ``ast`` on every module under src/deft, module-level imports and
imports inside functions alike (only imports under ``if TYPE_CHECKING:`` are skipped: they never run).

The layers are the one table :data:`LAYERS` below. To add a module, give it (or its package) a rank
there; to let a module use a higher one, move the shared piece down instead.
"""

from __future__ import annotations

import ast
import os
import subprocess
import sys
from collections.abc import Iterable, Mapping
from pathlib import Path

SRC = Path(__file__).resolve().parents[1] / "src"

# package or module -> rank; a module's layer is the longest entry its dotted name starts with. Lower ranks
# never import higher ones (same rank: allowed, as long as no cycle forms).
LAYERS: dict[str, int] = {
    # base utilities: import nothing from deft but each other
    "deft.errors": 0,
    "deft.fields": 0,
    "deft.io": 0,
    "deft.console": 0,
    "deft.version": 0,
    # what deft knows about architectures (the MLP table, nn helpers) and model names
    "deft.arch": 1,
    "deft.models": 1,
    # the core: activation probe, density loss, density report, per-layer thresholds
    "deft.core": 2,
    # the library's parts, each built on the core
    "deft.data": 3,
    "deft.methods": 3,
    "deft.sparse": 3,
    "deft.train": 3,
    "deft.inference": 3,
    "deft.analysis": 3,
    "deft.testing": 3,
    # compression selects its linears through the methods' LoRA targets
    "deft.compress": 4,
    # task families: data, model names, compression at load time, activation swaps
    "deft.tasks": 5,
    # the public facade (deft/__init__.py): re-exports the library, never the recipes or the CLI
    "deft": 6,
    # recipes: plain functions over argument dataclasses
    "deft.recipes": 7,
    # the command line
    "deft.cli": 8,
    "deft.__main__": 8,
}
FACADE = "deft"  # nothing inside deft imports it: recipes and the CLI import the real modules
LIBRARY_MAX = LAYERS["deft.tasks"]  # everything up to here is the library: it never imports recipes or the CLI


# ---------------------------------------------------------------------------------------------- parsing
def module_name(path: Path, root: Path = SRC) -> tuple[str, bool]:
    """(dotted module name, is a package __init__) of a file under ``root``."""
    parts = list(path.relative_to(root).with_suffix("").parts)
    if parts[-1] == "__init__":
        return ".".join(parts[:-1]), True
    return ".".join(parts), False


def _is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
    )


def _import_nodes(tree: ast.AST) -> Iterable[ast.Import | ast.ImportFrom]:
    """Every import statement, at any depth (functions, classes, try blocks), except under TYPE_CHECKING."""
    stack = [tree]
    while stack:
        node = stack.pop()
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            yield node
        if isinstance(node, ast.If) and _is_type_checking(node.test):
            stack.extend(node.orelse)  # the body only runs for type checkers
            continue
        stack.extend(ast.iter_child_nodes(node))


def imports_of(source: str, module: str, is_package: bool, modules: set[str]) -> list[tuple[int, str]]:
    """(line, imported deft module) of every import of ``source``, relative imports resolved.

    ``from pkg import name`` counts as importing ``pkg.name`` when that is one of ``modules``, else ``pkg``.
    """
    package = module if is_package else module.rpartition(".")[0]
    found: list[tuple[int, str]] = []
    for node in _import_nodes(ast.parse(source)):
        if isinstance(node, ast.Import):
            found += [(node.lineno, a.name) for a in node.names]
            continue
        if node.level:
            base = package.split(".")
            base = base[: len(base) - (node.level - 1)]
            target = ".".join(base + ([node.module] if node.module else []))
        else:
            target = node.module or ""
        for alias in node.names:
            sub = f"{target}.{alias.name}"
            found.append((node.lineno, sub if sub in modules else target))
    return [(line, t) for line, t in found if t == "deft" or t.startswith("deft.")]


def import_graph(root: Path = SRC) -> dict[str, list[tuple[str, int, str]]]:
    """module -> [(file, line, imported deft module)] for every module under ``root / "deft"``."""
    files = sorted((root / "deft").rglob("*.py"))
    names = {f: module_name(f, root) for f in files}
    modules = {name for name, _ in names.values()}
    graph: dict[str, list[tuple[str, int, str]]] = {}
    for f, (name, is_pkg) in names.items():
        rel = str(f.relative_to(root.parent)) if root.parent in f.parents else str(f)
        graph[name] = [
            (rel, line, target) for line, target in imports_of(f.read_text(encoding="utf-8"), name, is_pkg, modules)
        ]
    return graph


# ---------------------------------------------------------------------------------------------- checks
def layer_of(module: str, layers: Mapping[str, int] = LAYERS) -> str | None:
    """The entry of ``layers`` that holds ``module`` (the longest prefix; the facade only by its exact name)."""
    best = None
    for key in layers:
        if key == FACADE and module != FACADE:
            continue
        if (module == key or module.startswith(key + ".")) and (best is None or len(key) > len(best)):
            best = key
    return best


def upward_imports(graph: Mapping[str, list[tuple[str, int, str]]], layers: Mapping[str, int] = LAYERS) -> list[str]:
    """One line per import from a lower layer into a higher one (or into the facade)."""
    problems = []
    for module, edges in sorted(graph.items()):
        here = layer_of(module, layers)
        for file, line, target in edges:
            there = layer_of(target, layers)
            if here is None or there is None or target == module:
                continue
            if target == FACADE and module != FACADE:
                problems.append(
                    f"{file}:{line}: {module} imports the deft facade; import the module that defines the name instead"
                )
            elif layers[there] > layers[here]:
                problems.append(
                    f"{file}:{line}: {module} (layer {here}, rank {layers[here]}) imports {target} "
                    f"(layer {there}, rank {layers[there]}), a higher layer"
                )
    return problems


def cycles(graph: Mapping[str, list[tuple[str, int, str]]]) -> list[tuple[list[str], list[str]]]:
    """The import cycles between modules: per strongly connected component, a closed path through it and
    all its modules."""
    edges = {m: sorted({t for _, _, t in es if t in graph and t != m}) for m, es in graph.items()}
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    components: list[list[str]] = []

    def visit(v: str) -> None:  # Tarjan's algorithm (graphs here are a few dozen modules: recursion is fine)
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in edges[v]:
            if w not in index:
                visit(w)
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

    for v in sorted(edges):
        if v not in index:
            visit(v)
    return [(_path_through(comp, edges), comp) for comp in components]


def _path_through(component: list[str], edges: Mapping[str, list[str]]) -> list[str]:
    """A closed import path inside one strongly connected component, starting at its first module."""
    inside = set(component)
    start = component[0]
    parents: dict[str, str] = {}
    queue = [start]
    while queue:  # breadth-first back to start: the shortest cycle through it
        v = queue.pop(0)
        for w in edges[v]:
            if w == start:
                path = [v]
                while path[-1] != start:
                    path.append(parents[path[-1]])
                return [start, *reversed(path[:-1]), start]
            if w in inside and w not in parents:
                parents[w] = v
                queue.append(w)
    return [*component, component[0]]  # pragma: no cover - a component always closes


def format_cycles(found: list[tuple[list[str], list[str]]]) -> list[str]:
    return [
        " -> ".join(path)
        + (
            f" (one cycle of {len(group)} modules importing each other: {', '.join(group)})"
            if len(group) > len(path) - 1
            else ""
        )
        for path, group in found
    ]


# ---------------------------------------------------------------------------------------------- tests
def test_every_module_has_a_layer():
    missing = [m for m in import_graph() if layer_of(m) is None]
    assert not missing, f"modules without an entry in tests/test_layers.py LAYERS: {missing}"


def test_no_import_cycles():
    found = format_cycles(cycles(import_graph()))
    assert not found, "import cycles between deft modules:\n" + "\n".join(found)


def test_no_import_from_a_lower_layer_into_a_higher_one():
    problems = upward_imports(import_graph())
    assert not problems, "imports into a higher layer:\n" + "\n".join(problems)


def test_the_library_never_imports_recipes_or_the_cli():
    # statically, every import (the layer rule above implies it; this names the rule)...
    graph = import_graph()
    bad = [
        f"{file}:{line}: {module} imports {target}"
        for module, edges in graph.items()
        if LAYERS[layer_of(module)] <= LIBRARY_MAX
        for file, line, target in edges
        if layer_of(target) in ("deft.recipes", "deft.cli", "deft.__main__")
    ]
    assert not bad, "\n".join(bad)
    # ... and at run time: `import deft` and every library module load neither (nor, for `import deft`, transformers)
    library = sorted(
        m
        for m in graph
        if LAYERS[layer_of(m)] <= LIBRARY_MAX and m not in ("deft.sparse.triton_gemv", "deft.train.integrations")
    )  # need CUDA / TRL
    code = (
        "import importlib, sys\nimport deft\n"
        "assert 'transformers' not in sys.modules, 'import deft loads transformers'\n"
        f"for m in {library!r}:\n    importlib.import_module(m)\n"
        "loaded = sorted(m for m in sys.modules if m.startswith(('deft.recipes', 'deft.cli')))\n"
        "assert not loaded, loaded\n"
    )
    r = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "PYTHONPATH": str(SRC)},
    )
    assert r.returncode == 0, r.stderr[-3000:]


def test_the_checks_find_a_cycle_and_an_upward_import(tmp_path):
    """The checker itself, on a fake package: it must be able to fail."""
    root = tmp_path / "src"
    files = {
        "deft/__init__.py": "",
        "deft/core/__init__.py": "from .thing import thing\n",
        # an upward import hidden in a function, and one under TYPE_CHECKING that must not count
        "deft/core/thing.py": (
            "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from ..cli import main\n"
            "def thing():\n    from ..recipes import a\n    return a\n"
        ),
        # a cycle: recipes.a -> recipes.b -> recipes.a (relative and absolute forms)
        "deft/recipes/__init__.py": "",
        "deft/recipes/a.py": "from . import b\n",
        "deft/recipes/b.py": "import deft.recipes.a\nfrom deft import thing\n",
        "deft/cli.py": "",
    }
    for name, text in files.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_text(text)
    graph = import_graph(root)
    assert graph["deft.core.thing"] == [("src/deft/core/thing.py", 5, "deft.recipes.a")]
    assert format_cycles(cycles(graph)) == ["deft.recipes.a -> deft.recipes.b -> deft.recipes.a"]
    problems = upward_imports(graph)
    assert any(
        p.startswith(
            "src/deft/core/thing.py:5: deft.core.thing (layer deft.core, rank 2) imports "
            "deft.recipes.a (layer deft.recipes, rank 7)"
        )
        for p in problems
    ), problems
    assert any(p.startswith("src/deft/recipes/b.py:2: deft.recipes.b imports the deft facade") for p in problems)
    assert len(problems) == 2, problems  # the TYPE_CHECKING import is not one
