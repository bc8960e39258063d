"""scripts/gen_docs.py, loaded as a module, and the README sections it generates."""

from __future__ import annotations

import importlib.util
from pathlib import Path
from types import ModuleType

REPO = Path(__file__).resolve().parents[3]


def _load_script() -> ModuleType:
    spec = importlib.util.spec_from_file_location("gen_docs", REPO / "scripts" / "gen_docs.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


gen_docs = _load_script()
README = (REPO / "README.md").read_text()


def section(name: str) -> str:
    """The README's generated section `name`, from its begin marker up to its end marker."""
    start = README.index(gen_docs.begin_marker(name))
    return README[start : README.index(gen_docs.end_marker(name), start)]
