"""Rules of the house that no linter checks for us."""

from __future__ import annotations

import ast
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
SOURCE_ROOTS = ("operator", "components", "tests", "benchmarks", "scripts", "examples")


def _python_files() -> list[Path]:
    return sorted(path for root in SOURCE_ROOTS for path in (REPO / root).rglob("*.py"))


def test_no_module_imports_kopfs_private_modules() -> None:
    """Kopf's underscore modules change without notice: use lightkube and Kopf's public API."""
    offenders = []
    for path in _python_files():
        for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
            names = []
            if isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module:
                names = [node.module] + [f"{node.module}.{alias.name}" for alias in node.names]
            offenders += [
                f"{path.relative_to(REPO)}:{node.lineno} {name}"
                for name in names
                if name.startswith("kopf._")
            ]
    assert offenders == []
