"""The package's import graph, read from source with `ast`: no cycles, and ray/optuna stay inside the search.

Every import counts, wherever it is written: module top, inside functions, under `if TYPE_CHECKING:`, relative
imports, `from pkg import name` (an edge to the submodule `pkg.name` when that is a module, else to `pkg`), and
`lazy_import("x.y")` / `importlib.import_module("x.y")` with a literal name. Importing `p.a.b.c` from a module
outside package `p.a.b` also runs `p/a/__init__.py` and `p/a/b/__init__.py`, so those edges are added too (an
edge to an ancestor package's `__init__` from a module inside that package is not: it is already running).
"""

from __future__ import annotations

import ast
import textwrap
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path

PACKAGE = "nas_minitron"
PACKAGE_DIR = Path(__file__).resolve().parents[1] / PACKAGE

# Modules allowed to import ray / optuna (and their submodules): the search, and the Ray Train trainer.
RAY_OPTUNA = ("ray", "optuna")
RAY_OPTUNA_ALLOWED_PACKAGES = ("nas_minitron.search",)
RAY_OPTUNA_ALLOWED_MODULES = ("nas_minitron.distill.ray_train", "nas_minitron.distill.ray_cache")

_DYNAMIC_IMPORTERS = {"lazy_import", "import_module"}


@dataclass
class ImportGraph:
    """Project modules, the project edges between them (with where each is written) and external imports."""

    root: Path
    modules: dict[str, Path]
    edges: dict[str, dict[str, int]] = field(default_factory=dict)  # src -> {dst: first line number}
    external: dict[str, dict[str, int]] = field(default_factory=dict)  # src -> {dotted name: first line}

    def add(self, table: dict[str, dict[str, int]], src: str, dst: str, line: int) -> None:
        targets = table.setdefault(src, {})
        targets[dst] = min(line, targets.get(dst, line))


def _module_names(root: Path, package: str) -> dict[str, Path]:
    """Every `.py` file under the package directory, by dotted module name (`a/__init__.py` is `a`)."""
    names: dict[str, Path] = {}
    for path in sorted(root.rglob("*.py")):
        parts = [package, *path.relative_to(root).with_suffix("").parts]
        if parts[-1] == "__init__":
            parts.pop()
        names[".".join(parts)] = path
    return names


def _is_package(modules: dict[str, Path], name: str) -> bool:
    return name in modules and modules[name].name == "__init__.py"


def _resolve_from(modules: dict[str, Path], src: str, node: ast.ImportFrom) -> str:
    """The absolute module name an `ImportFrom` reads from (relative levels resolved against `src`)."""
    if not node.level:
        return node.module or ""
    base = src.split(".") if _is_package(modules, src) else src.split(".")[:-1]
    base = base[: len(base) - (node.level - 1)]
    return ".".join([*base, node.module] if node.module else base)


def _imported_names(modules: dict[str, Path], src: str, tree: ast.AST) -> list[tuple[str, int]]:
    """(dotted module name, line) for every import written anywhere in one module's syntax tree."""
    found: list[tuple[str, int]] = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [(alias.name, node.lineno) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = _resolve_from(modules, src, node)
            for alias in node.names:
                sub = f"{base}.{alias.name}"
                found.append((sub if sub in modules else base, node.lineno))
        elif isinstance(node, ast.Call):
            func = node.func
            name = func.id if isinstance(func, ast.Name) else func.attr if isinstance(func, ast.Attribute) else ""
            arg = node.args[0] if node.args else None
            if name in _DYNAMIC_IMPORTERS and isinstance(arg, ast.Constant) and isinstance(arg.value, str):
                found.append((arg.value, node.lineno))
    return found


def _project_target(modules: dict[str, Path], name: str) -> str | None:
    """The project module `name` runs: itself, or its longest importable prefix (`pkg.mod.attr` -> `pkg.mod`)."""
    parts = name.split(".")
    while parts:
        candidate = ".".join(parts)
        if candidate in modules:
            return candidate
        parts.pop()
    return None


def build_graph(root: Path, package: str) -> ImportGraph:
    """The import graph of `package`, whose source directory is `root`."""
    graph = ImportGraph(root=root, modules=_module_names(root, package))
    for src, path in graph.modules.items():
        tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
        for name, line in _imported_names(graph.modules, src, tree):
            if name != package and not name.startswith(package + "."):
                graph.add(graph.external, src, name, line)
                continue
            dst = _project_target(graph.modules, name)
            if dst is None:
                continue
            ancestors = [".".join(dst.split(".")[:i]) for i in range(1, dst.count(".") + 1)]
            for target in [dst, *ancestors]:
                inside = src == target or src.startswith(target + ".")
                if target != src and (target == dst or not inside) and target in graph.modules:
                    graph.add(graph.edges, src, target, line)
    return graph


def _strongly_connected(edges: dict[str, dict[str, int]]) -> list[list[str]]:
    """Tarjan's strongly connected components with more than one member (self-edges are never added)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    components: list[list[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for succ in sorted(edges.get(node, {})):
            if succ not in index:
                visit(succ)
                low[node] = min(low[node], low[succ])
            elif succ in on_stack:
                low[node] = min(low[node], index[succ])
        if low[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.append(member)
                if member == node:
                    break
            if len(component) > 1:
                components.append(sorted(component))

    nodes = sorted(set(edges) | {d for targets in edges.values() for d in targets})
    for node in nodes:
        if node not in index:
            visit(node)
    return components


def _shortest_path(edges: dict[str, dict[str, int]], start: str, goal: str, allowed: set[str]) -> list[str]:
    """A shortest path start -> ... -> goal inside `allowed` (breadth first; it exists within an SCC)."""
    previous: dict[str, str | None] = {start: None}
    queue = deque([start])
    while queue:
        node = queue.popleft()
        if node == goal:
            break
        for succ in sorted(edges.get(node, {})):
            if succ in allowed and succ not in previous:
                previous[succ] = node
                queue.append(succ)
    path: list[str] = []
    step: str | None = goal
    while step is not None:
        path.append(step)
        step = previous[step]
    return path[::-1]


def find_cycles(graph: ImportGraph) -> list[list[str]]:
    """Cycles covering every edge that lies on a cycle: for each such edge u -> v, u -> v -> ... -> u (shortest),
    each rotated to start at its smallest module and deduplicated. Each cycle ends where it starts."""
    cycles: set[tuple[str, ...]] = set()
    for component in _strongly_connected(graph.edges):
        members = set(component)
        for src in component:
            for dst in graph.edges.get(src, {}):
                if dst in members:
                    loop = [src, *_shortest_path(graph.edges, dst, src, members)[:-1]]
                    first = loop.index(min(loop))
                    cycles.add(tuple(loop[first:] + loop[:first]))
    return [[*cycle, cycle[0]] for cycle in sorted(cycles, key=lambda c: (len(c), c))]


def describe_cycle(graph: ImportGraph, cycle: list[str]) -> str:
    """`a -> b -> a`, then where each import is written (`a.py:12`)."""
    where = ", ".join(
        f"{graph.modules[src].relative_to(graph.root.parent).as_posix()}:{graph.edges[src][dst]}"
        for src, dst in zip(cycle, cycle[1:], strict=False)
    )
    return f"{' -> '.join(cycle)}   [{where}]"


def _graph() -> ImportGraph:
    return build_graph(PACKAGE_DIR, PACKAGE)


def test_the_package_has_no_import_cycle() -> None:
    graph = _graph()
    cycles = find_cycles(graph)
    report = "\n".join(describe_cycle(graph, cycle) for cycle in cycles)
    assert not cycles, f"{len(cycles)} import cycle(s) in {PACKAGE}:\n{report}"


def _ray_optuna_allowed(module: str) -> bool:
    in_package = any(module == p or module.startswith(p + ".") for p in RAY_OPTUNA_ALLOWED_PACKAGES)
    return in_package or module in RAY_OPTUNA_ALLOWED_MODULES


def test_ray_and_optuna_are_imported_only_by_the_search_and_the_ray_modules_of_distill() -> None:
    graph = _graph()
    offenders = sorted(
        f"{src} imports {name} (line {line})"
        for src, names in graph.external.items()
        for name, line in names.items()
        if name.split(".")[0] in RAY_OPTUNA and not _ray_optuna_allowed(src)
    )
    assert not offenders, ("ray/optuna imported outside nas_minitron/search/ and distill/ray_train.py, "
                           "ray_cache.py:\n" + "\n".join(offenders))
    importers = {src for src, names in graph.external.items() if any(n.split(".")[0] in RAY_OPTUNA for n in names)}
    assert importers, "the parser found no ray/optuna import at all: it is broken, or the search moved"


# --- the parser itself -------------------------------------------------------------------------------------------


def test_parser_finds_known_edges_of_the_package() -> None:
    graph = _graph()
    assert "nas_minitron.errors" in graph.edges["nas_minitron.pipeline.stages"]
    assert "nas_minitron.arch" in graph.edges["nas_minitron"]  # the package __init__ is a node too
    assert "torch" in graph.external["nas_minitron.runtime"]  # lazy_import("torch")
    assert "nas_minitron.prune" in graph.edges["nas_minitron.pipeline.stages"]  # prune.x also runs prune/__init__
    assert "nas_minitron" not in graph.edges["nas_minitron.pipeline.stages"]  # ...but never the root package's


def _write_tree(root: Path, files: dict[str, str]) -> None:
    for relative, source in files.items():
        path = root / relative
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(textwrap.dedent(source), encoding="utf-8")


def test_parser_finds_hidden_cycles_in_a_synthetic_tree(tmp_path: Path) -> None:
    root = tmp_path / "pkg"
    _write_tree(
        root,
        {
            "__init__.py": "",
            # a <-> b: the way back is hidden under TYPE_CHECKING
            "a.py": "from pkg import b\n",
            "b.py": """
                from typing import TYPE_CHECKING
                if TYPE_CHECKING:
                    from pkg.a import thing
            """,
            # c <-> d: the way back is inside a function, as a relative import
            "c.py": "import pkg.d\n",
            "d.py": """
                def f():
                    from .c import g
                    return g
            """,
            # e -> sub.leaf also runs sub/__init__.py, which imports e back (lazily): e -> sub -> e
            "e.py": "from pkg.sub.leaf import x\n",
            "sub/__init__.py": """
                from pkg._lazy import lazy_import
                e = lazy_import("pkg.e")
            """,
            "sub/leaf.py": "from . import other\nfrom .. import a\n",  # `from . import other`: the submodule
            "sub/other.py": "import pkg.sub.leaf\n",  # leaf <-> other, but no edge to sub/__init__ from inside
            "_lazy.py": "def lazy_import(name): ...\n",
            "free.py": "import os\nimport ray.tune\n",
        },
    )
    graph = build_graph(root, "pkg")
    cycles = {" -> ".join(c) for c in find_cycles(graph)}
    assert cycles == {
        "pkg.a -> pkg.b -> pkg.a",
        "pkg.c -> pkg.d -> pkg.c",
        "pkg.e -> pkg.sub -> pkg.e",
        "pkg.sub.leaf -> pkg.sub.other -> pkg.sub.leaf",
    }
    assert "pkg.sub" not in graph.edges["pkg.sub.leaf"]  # an ancestor __init__ from inside its package
    assert "pkg.a" in graph.edges["pkg.sub.leaf"]  # `from .. import a`
    assert graph.external["pkg.free"] == {"os": 1, "ray.tune": 2}
    assert "pkg.e -> pkg.sub -> pkg.e" in describe_cycle(graph, ["pkg.e", "pkg.sub", "pkg.e"])
