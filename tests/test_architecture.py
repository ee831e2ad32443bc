"""The layout is the architecture: layers import downwards only, and nothing imports in a circle.

The import graph is built from the AST of every module of ``bridge``, imports
inside functions and under ``TYPE_CHECKING`` included.  See docs/architecture.md.
"""

from __future__ import annotations

import ast
import re
from pathlib import Path

from bridge.wire.errors import MEANINGS, ErrorType

ROOT = Path(__file__).resolve().parent.parent
PACKAGE = ROOT / "bridge"
LAYERS = ["wire", "observe", "worker", "lm", "programs", "commands", "transcripts", "host", "cli"]
# The package root is the public API (and holds ``__version__``); ``__main__`` runs the CLI.
ROOT_MODULES = {"bridge", "bridge.__main__"}


def module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports_of(path: Path) -> set[str]:
    """Every ``bridge`` module ``path`` imports, wherever the import statement is."""
    package = module_name(path) if path.name == "__init__.py" else module_name(path).rpartition(".")[0]
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(anchor + ([base] if base else []))
            found.add(base)
            found.update(f"{base}.{alias.name}" for alias in node.names)
    modules = {module_name(p) for p in PACKAGE.rglob("*.py")}
    return {name for name in found if name in modules} - {module_name(path)}


def graph() -> dict[str, set[str]]:
    return {module_name(p): imports_of(p) for p in sorted(PACKAGE.rglob("*.py"))}


def layer(module: str) -> int:
    return LAYERS.index(module.split(".")[1])


def test_every_module_is_in_a_layer():
    for module in graph():
        assert module in ROOT_MODULES or module.split(".")[1] in LAYERS, f"{module} is in no layer"


def test_no_import_points_up_the_layers():
    upward = [f"{m} imports {i}" for m, targets in graph().items() if m not in ROOT_MODULES
              for i in targets if i not in ROOT_MODULES and layer(i) > layer(m)]
    assert not upward, "\n".join(upward)


def test_layers_use_only_the_version_from_the_package_root():
    for path in PACKAGE.rglob("*.py"):
        module = module_name(path)
        if module in ROOT_MODULES:
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module == "bridge" and not node.level:
                assert [a.name for a in node.names] == ["__version__"], f"{module} imports the public API"


def test_no_import_cycles():
    edges = graph()
    cycles: list[list[str]] = []
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(module: str) -> None:
        state[module] = 1
        path.append(module)
        for target in sorted(edges.get(module, ())):
            if state.get(target) == 1:
                cycles.append(path[path.index(target):] + [target])
            elif target not in state:
                visit(target)
        path.pop()
        state[module] = 2

    for module in sorted(edges):
        if module not in state:
            visit(module)
    assert not cycles, "\n".join(" -> ".join(c) for c in cycles)


def test_the_graph_sees_imports_inside_functions():
    """The checks above would pass vacuously if nested imports were missed."""
    assert "bridge.programs.streaming" in graph()["bridge.programs.runner"]  # imported inside run()


def test_every_error_type_has_a_meaning_and_docs_list_them_all():
    types = {v for k, v in vars(ErrorType).items() if k.isupper()}
    assert types == set(MEANINGS)
    text = (ROOT / "docs" / "protocol.md").read_text()
    section = text.split("## Error types", 1)[1].split("\n## ", 1)[0]
    documented = set(re.findall(r"^\| `([a-z_]+)` \|", section, re.M))
    assert documented == types, f"only in docs: {documented - types}; undocumented: {types - documented}"
