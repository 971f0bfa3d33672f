"""No import cycle between the modules of the backend package: its import graph, read from the source with
`ast` (nothing is imported), has no cycle. Every import counts: at the top of a module, inside a function,
or under `if TYPE_CHECKING:`; an import moved into a function dodges a cycle at run time but keeps the two
modules knotted together."""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[2] / "backend" / "earthdial"


def module_files(package: Path) -> dict[str, Path]:
    """Dotted module name -> file, for every module of the package (a package is its __init__.py)."""
    modules = {}
    for path in sorted(package.rglob("*.py")):
        parts = list(path.relative_to(package.parent).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        modules[".".join(parts)] = path
    return modules


def imported_modules(name: str, path: Path, modules: dict[str, Path]) -> set[str]:
    """The package's modules that module `name` imports anywhere in its file. `from a import b` is an
    edge to a.b when that is a module, else to a; relative imports resolve against the module's package."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), filename=str(path))):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                parts = package.split(".")
                base = ".".join(
                    parts[: len(parts) - (node.level - 1)] + ([node.module] if node.module else [])
                )
            else:
                base = node.module or ""
            submodules = {f"{base}.{alias.name}" for alias in node.names} & modules.keys()
            found.update(submodules or {base})
    return {target for target in found if target in modules and target != name}


def import_graph(package: Path) -> dict[str, set[str]]:
    modules = module_files(package)
    return {name: imported_modules(name, path, modules) for name, path in modules.items()}


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One cycle of the graph as [a, b, ..., a], or None: a depth-first walk that meets a module still on
    its own path."""
    state: dict[str, int] = {}  # 1: on the current path, 2: done (no cycle through it)
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        path.append(node)
        for target in sorted(graph.get(node, ())):
            if state.get(target) == 1:
                return [*path[path.index(target) :], target]
            if target not in state and (cycle := visit(target)) is not None:
                return cycle
        path.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state and (cycle := visit(node)) is not None:
            return cycle
    return None


def test_the_backend_package_has_no_import_cycle() -> None:
    graph = import_graph(PACKAGE)
    assert graph["earthdial.geo.imagery"] >= {"earthdial.limits"}  # the walk sees imports,
    # and resolves the contract's relative ones (the client uses the wire format)
    assert graph["earthdial.contract.client"] == {"earthdial.contract.wire"}
    cycle = find_cycle(graph)
    assert cycle is None, "import cycle: " + " -> ".join(cycle or [])


def test_the_walk_finds_a_cycle_through_a_function_level_or_relative_import(tmp_path: Path) -> None:
    package = tmp_path / "pkg"
    (package / "sub").mkdir(parents=True)
    for init in (package / "__init__.py", package / "sub" / "__init__.py"):
        init.write_text("")
    (package / "a.py").write_text("from pkg.sub import b\n")
    (package / "sub" / "b.py").write_text("from .. import c\n")  # relative: pkg.c
    (package / "c.py").write_text("import os\n\ndef f():\n    from pkg import a  # only inside a function\n")
    graph = import_graph(package)
    assert graph == {
        "pkg": set(),
        "pkg.sub": set(),
        "pkg.a": {"pkg.sub.b"},
        "pkg.sub.b": {"pkg.c"},
        "pkg.c": {"pkg.a"},
    }
    assert find_cycle(graph) == ["pkg.a", "pkg.sub.b", "pkg.c", "pkg.a"]
    (package / "c.py").write_text("import os\n")
    assert find_cycle(import_graph(package)) is None


def test_a_type_checking_import_is_an_edge(tmp_path: Path) -> None:
    package = tmp_path / "pkg"
    package.mkdir()
    (package / "__init__.py").write_text("")
    (package / "a.py").write_text("from pkg import b\n")
    (package / "b.py").write_text(
        "from typing import TYPE_CHECKING\n\nif TYPE_CHECKING:\n    from pkg.a import X\n"
    )
    assert find_cycle(import_graph(package)) == ["pkg.a", "pkg.b", "pkg.a"]


# The packages in layers, lowest first: a module imports only from its own package and the ones before it.
# `limits` (budgets and cancellation) is one module below everything that reads or scans.
LAYERS = (
    "contract",
    "limits",
    "model",
    "demo",
    "geo",
    "outputs",
    "scenes",
    "serving",
    "jobs",
    "install",
    "training",
    "cli",
)


def layer_of(module: str) -> str | None:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else None  # earthdial itself has no layer


def upward_imports(graph: dict[str, set[str]], layers: tuple[str, ...]) -> list[str]:
    """Each import of a module from a later layer than its own (or from a package not in `layers`)."""
    rank = {name: i for i, name in enumerate(layers)}
    found = []
    for module, targets in sorted(graph.items()):
        own = layer_of(module)
        for target in sorted(targets):
            other = layer_of(target)
            if own is None or other is None or other == own:
                continue
            if own not in rank or other not in rank or rank[other] > rank[own]:
                found.append(f"{module} -> {target}")
    return found


def test_the_packages_are_layers() -> None:
    graph = import_graph(PACKAGE)
    packages = {layer_of(m) for m in graph} - {None}
    assert packages == set(LAYERS), packages ^ set(LAYERS)  # a new package takes its place in LAYERS
    assert upward_imports(graph, LAYERS) == []


def test_the_layer_check_finds_an_upward_import() -> None:
    graph = {"earthdial.geo.imagery": {"earthdial.serving.limits", "earthdial.model.pixels"}}
    assert upward_imports(graph, ("model", "geo", "serving")) == [
        "earthdial.geo.imagery -> earthdial.serving.limits"
    ]
    assert upward_imports(graph, ("model", "serving", "geo")) == []
