"""README.md's generated sections (scripts/gen_docs.py) are current and complete."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from readme_sections import README, REPO, gen_docs, section

from kubetune.api.crd import openapi_schema
from kubetune.api.definition import ResourceDefinition
from kubetune.api.registry import all_definitions


def leaf_paths(node: dict[str, object], path: str = "") -> list[str]:
    paths: list[str] = []
    properties = node.get("properties")
    assert properties is None or isinstance(properties, dict)
    for name, child in (properties or {}).items():
        child_path = f"{path}.{name}" if path else name
        paths.append(child_path)
        if child.get("type") == "array" and isinstance(child.get("items"), dict):
            paths += leaf_paths(child["items"], f"{child_path}[]")
        else:
            paths += leaf_paths(child, child_path)
    return paths


def test_readme_is_current() -> None:
    assert gen_docs.stale_sections(README) == [], "run: python scripts/gen_docs.py"
    assert gen_docs.main(["--check"]) == 0


def test_values_reference_has_every_key_of_the_schema() -> None:
    schema = json.loads((REPO / "charts" / "kubetune" / "values.schema.json").read_text())
    text = section("values-reference")
    keys = [p for p in leaf_paths(schema) if "properties" not in _node(schema, p)]
    assert len(keys) > 30
    for key in keys:
        assert f"| `{key}` |" in text, key
    assert "| `metrics.port` | integer (≥ 1024, ≤ 65535) | `9090` |" in text
    assert "| `defaultExecutor` | one of `local`, `kfp` | `local` |" in text


def _node(schema: dict[str, object], path: str) -> dict[str, object]:
    node: dict[str, object] = schema
    for part in path.replace("[]", ".[]").split("."):
        if part == "[]":
            items = node["items"]
            assert isinstance(items, dict)
            node = items
        else:
            properties = node["properties"]
            assert isinstance(properties, dict)
            node = properties[part]
    return node


@pytest.mark.parametrize("definition", all_definitions(), ids=lambda d: d.kind)
def test_crd_reference_has_every_field_of_every_kind(definition: ResourceDefinition) -> None:
    text = section("crd-reference")
    schema = openapi_schema(definition)
    assert f"<b>{definition.kind}</b>" in text
    for part in ("spec", "status"):
        if part in schema["properties"]:
            for path in leaf_paths(schema["properties"][part], part):
                assert f"| `{path}` |" in text, path


def test_crd_reference_shows_types_defaults_and_required_fields() -> None:
    text = section("crd-reference")
    assert "| `spec.baseModel.uri` | string | required |" in text
    assert (
        "| `spec.dataset.format` | one of `text`, `instruction`, `chat`, `preference`, `feedback` "
        "| `instruction` |" in text
    )


def test_check_mode_detects_drift_and_missing_markers(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    edited = README.replace("| `metrics.port` |", "| `metrics.portal` |")
    assert gen_docs.stale_sections(edited) == ["values-reference"]
    readme = tmp_path / "README.md"
    readme.write_text(edited)
    monkeypatch.setattr(gen_docs, "README", readme)
    assert gen_docs.main(["--check"]) == 1
    assert gen_docs.main([]) == 0
    assert readme.read_text() == README  # only the generated section changed back
    readme.write_text(README.replace(gen_docs.end_marker("crd-reference"), ""))
    assert gen_docs.main([]) == 2
