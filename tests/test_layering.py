"""The house's layering, read from the source with ``ast`` (nothing is imported).

- ``common/`` is the ground floor: no module under it imports a stage folder or ``scripts``,
  at any depth (a function-local import counts).
- No import cycle among the project's modules (every import statement counts, at any depth).
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("common", "benchmark_inference", "benchmark_parallel_prefill", "token_alignment", "feature_alignment",
            "scripts")
UPPER = frozenset(PACKAGES) - {"common"}


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _project_modules() -> dict[str, Path]:
    return {_module_name(p): p for pkg in PACKAGES for p in sorted((ROOT / pkg).rglob("*.py"))}


def _imported_names(path: Path, module: str, known: frozenset[str] = frozenset()) -> list[tuple[str, int]]:
    """The module each import statement in ``path`` names, at any depth: ``from a import b`` gives ``a.b``
    when that is a module in ``known``, else ``a``."""
    is_package = path.name == "__init__.py"
    out: list[tuple[str, int]] = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            out.extend((alias.name, node.lineno) for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # relative: resolve against this module's package
                anchor = module.split(".")[: len(module.split(".")) - node.level + (1 if is_package else 0)]
                base = ".".join([*anchor, *([base] if base else [])])
            out.extend((f"{base}.{alias.name}" if f"{base}.{alias.name}" in known else base, node.lineno)
                       for alias in node.names)
    return out


def _graph() -> dict[str, set[str]]:
    modules = _project_modules()
    known = frozenset(modules)
    return {name: {n for n, _ in _imported_names(path, name, known) if n in known and n != name}
            for name, path in modules.items()}


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph.get(v, ())):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


def test_common_imports_no_stage_folder_or_scripts() -> None:
    offenders = []
    for name, path in _project_modules().items():
        if not name.startswith("common"):
            continue
        for imported, line in _imported_names(path, name):
            if imported.split(".")[0] in UPPER:
                offenders.append(f"{path.relative_to(ROOT)}:{line} imports {imported}")
    assert offenders == []


def test_no_import_cycle_between_project_modules() -> None:
    assert _cycles(_graph()) == []


def test_the_checks_see_an_upward_import_and_a_cycle(tmp_path: Path) -> None:
    """The readers catch what they guard against: a function-local upward import and a two-module cycle."""
    src = tmp_path / "m.py"
    src.write_text("def f():\n    from feature_alignment.x import y\n    from . import z\n")
    names = [n for n, _ in _imported_names(src, "common.m", frozenset({"common.z"}))]
    assert names == ["feature_alignment.x", "common.z"]
    assert _cycles({"a": {"b"}, "b": {"a"}, "c": {"a"}}) == [["a", "b"]]
    assert _cycles({"a": {"b"}, "b": set()}) == []


@pytest.mark.parametrize("module", ["common.drafters.factory", "common.hybrid", "common.defaults"])
def test_the_old_offenders_are_clean(module: str) -> None:
    path = _project_modules()[module]
    assert not [n for n, _ in _imported_names(path, module) if n.split(".")[0] in UPPER]


@pytest.mark.parametrize(("old", "new"), [
    ("feature_alignment.hidden_adapter", "common.drafters.hidden_adapter"),
    ("feature_alignment.drafter", "common.drafters.hidden_drafter"),
    ("feature_alignment.eagle_head", "common.drafters.eagle_head"),
    ("token_alignment.token_adapter", "common.drafters.token_adapter"),
    ("token_alignment.drafter", "common.drafters.token_drafter"),
])
def test_the_moved_modules_keep_their_old_names(old: str, new: str) -> None:
    import importlib

    assert importlib.import_module(old) is importlib.import_module(new)
