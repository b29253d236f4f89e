"""The floors of the house (docs/house-style.md): who may import whom, read from every module's whole
syntax tree, so a function-level import counts as much as one at the top."""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).parents[1] / "residual_lightning"
CORE = ("residual_lightning.contributions", "residual_lightning.units", "residual_lightning.spectral",
        "residual_lightning.unit_bases", "residual_lightning.transform", "residual_lightning.residual",
        "residual_lightning.baselines", "residual_lightning.adapters", "residual_lightning.files",
        "residual_lightning.backbones")  # fmt: skip
UPPER = ("residual_lightning.data", "residual_lightning.model", "residual_lightning.finetune",
         "residual_lightning.callbacks", "residual_lightning.analysis", "residual_lightning.cli",
         "residual_lightning.checkpoints", "residual_lightning.grid")  # fmt: skip
ENTRY_POINTS = ("residual_lightning.cli", "residual_lightning.analysis.cli")


def module_name(path: Path) -> str:
    parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports(path: Path) -> set[str]:
    """Every residual_lightning module `path` imports, anywhere in the file."""
    name = module_name(path)
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = package.split(".")
                base = ".".join(parts[: len(parts) - node.level + 1] + ([base] if base else []))
            found.add(base)
            found |= {f"{base}.{a.name}" for a in node.names}  # `from pkg import module`
    modules = {module_name(p) for p in PACKAGE.rglob("*.py")}
    return {m for m in found if m in modules and m != name}


GRAPH = {module_name(p): imports(p) for p in PACKAGE.rglob("*.py")}


def is_under(module: str, prefixes: tuple[str, ...]) -> bool:
    return any(module == p or module.startswith(p + ".") for p in prefixes)


def test_the_core_imports_nothing_from_the_upper_floors():
    bad = {(m, dep) for m, deps in GRAPH.items() if is_under(m, CORE) for dep in deps if is_under(dep, UPPER)}
    assert not bad, sorted(bad)


def test_no_module_imports_an_entry_point():
    allowed = {("residual_lightning.cli", "residual_lightning.analysis.cli")}  # the `analyze` dispatch
    bad = {
        (m, dep)
        for m, deps in GRAPH.items()
        for dep in deps
        if dep in ENTRY_POINTS and (m, dep) not in allowed and not dep.startswith(m + ".")
    }
    assert not bad, sorted(bad)


def test_no_import_circle():
    """Depth-first search for a cycle among the package's modules (packages' __init__ excluded:
    importing a submodule runs its package's __init__ by construction)."""
    graph = {m: {d for d in deps if not m.startswith(d + ".")} for m, deps in GRAPH.items()}
    state: dict[str, int] = {}
    cycles = []

    def visit(node: str, path: list[str]) -> None:
        state[node] = 1
        for dep in sorted(graph.get(node, ())):
            if state.get(dep) == 1:
                cycles.append([*path[path.index(dep) :], dep])
            elif dep not in state:
                visit(dep, [*path, dep])
        state[node] = 2

    for module in sorted(graph):
        if module not in state:
            visit(module, [module])
    assert not cycles, cycles


def test_the_graph_is_read_from_the_whole_tree():
    """The checker itself: a function-level import is found (today's circle hid in one)."""
    source = "def f():\n    from residual_lightning.cli import main\n"
    tree_imports = {
        n.module for n in ast.walk(ast.parse(source)) if isinstance(n, ast.ImportFrom) and n.module
    }
    assert tree_imports == {"residual_lightning.cli"}
    # cli.main dispatches to `analyze` with an import inside the function: the graph has it.
    assert "residual_lightning.analysis.cli" in GRAPH["residual_lightning.cli"]
