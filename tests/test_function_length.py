"""House rule: no function in the project's packages is longer than 100 lines (issue #17)."""

from __future__ import annotations

import ast
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
PACKAGES = ("common", "benchmark_inference", "benchmark_parallel_prefill", "token_alignment", "feature_alignment",
            "scripts")
MAX_LINES = 100
# Functions over the limit that another branch is splitting right now: "path:qualified name" -> why.
# Remove an entry as soon as that branch lands; an entry that is no longer too long fails the test.
ALLOWED: dict[str, str] = {}  # "path.py:qualname": why it may stay long for now


def function_lengths(path: Path) -> dict[str, int]:
    """Lines (``end_lineno - lineno + 1``) of every function and method in ``path``, by qualified name."""
    out: dict[str, int] = {}

    def visit(node: ast.AST, prefix: str) -> None:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef)):
                name = f"{prefix}{child.name}"
                out[name] = max(out.get(name, 0), child.end_lineno - child.lineno + 1)
                visit(child, f"{name}.")
            elif isinstance(child, ast.ClassDef):
                visit(child, f"{prefix}{child.name}.")
            else:
                visit(child, prefix)

    visit(ast.parse(path.read_text(encoding="utf-8"), filename=str(path)), "")
    return out


def long_functions() -> dict[str, int]:
    found = {}
    for package in PACKAGES:
        for path in sorted((REPO / package).rglob("*.py")):
            rel = path.relative_to(REPO).as_posix()
            for name, lines in function_lengths(path).items():
                if lines > MAX_LINES:
                    found[f"{rel}:{name}"] = lines
    return found


def test_function_lengths_are_measured_per_function(tmp_path):
    src = tmp_path / "m.py"
    src.write_text("def f():\n    x = 1\n    return x\n\n\nclass C:\n    def g(self):\n"
                   + "        pass\n" * 101 + "\n    async def h(self):\n        def inner():\n            pass\n")
    assert function_lengths(src) == {"f": 3, "C.g": 102, "C.h": 3, "C.h.inner": 2}


def test_no_function_is_longer_than_100_lines():
    found = long_functions()
    new = {k: v for k, v in found.items() if k not in ALLOWED}
    assert not new, "split these functions (lines > 100): " + ", ".join(f"{k} ({v})" for k, v in sorted(new.items()))
    stale = sorted(set(ALLOWED) - set(found))
    assert not stale, f"no longer over {MAX_LINES} lines: drop from ALLOWED: {', '.join(stale)}"
