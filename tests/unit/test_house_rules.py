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


def test_test_modules_outside_packages_have_unique_names() -> None:
    """pytest imports a test file that is not in a package by its basename: two such files with one
    name break collection of the whole suite ("import file mismatch")."""
    by_name: dict[str, list[str]] = {}
    for path in sorted((REPO / "tests").rglob("test_*.py")):
        if not (path.parent / "__init__.py").exists():
            by_name.setdefault(path.name, []).append(str(path.relative_to(REPO)))
    assert {name: paths for name, paths in by_name.items() if len(paths) > 1} == {}
