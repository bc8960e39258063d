"""Every field of every CRD explains itself: `kubectl explain ftj.spec.training` (or any other field, status
included) prints a description, because the contract models carry one for each field."""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from typing import Any

import pytest

from kubetune.api.crd import all_crds, build_crd
from kubetune.api.definition import ResourceDefinition
from kubetune.api.registry import all_definitions

# The API server documents metadata itself (ObjectMeta); the CRD only declares it an object.
UNDESCRIBED_BY_DESIGN = frozenset({"metadata"})


def properties(node: Mapping[str, Any], path: str) -> Iterator[tuple[str, Mapping[str, Any]]]:
    """Every property below ``node``, as (dotted path, schema node), list items and map values included."""
    for name, child in node.get("properties", {}).items():
        child_path = f"{path}.{name}" if path else name
        yield child_path, child
        yield from properties(child, child_path)
    if isinstance(node.get("items"), Mapping):
        yield from properties(node["items"], f"{path}[*]")
    if isinstance(node.get("additionalProperties"), Mapping):
        yield from properties(node["additionalProperties"], f"{path}[*]")


def undescribed(definition: ResourceDefinition) -> list[str]:
    schema = build_crd(definition)["spec"]["versions"][0]["schema"]["openAPIV3Schema"]
    return [
        path
        for path, node in properties(schema, "")
        if path not in UNDESCRIBED_BY_DESIGN and not str(node.get("description", "")).strip()
    ]


@pytest.mark.parametrize("definition", all_definitions(), ids=lambda d: d.kind)
def test_every_property_has_a_description(definition: ResourceDefinition) -> None:
    missing = undescribed(definition)
    assert not missing, (
        f"{definition.kind}: {len(missing)} fields without a description: {', '.join(missing)}"
    )


def test_the_walk_reaches_list_items_and_status() -> None:
    """The check above would pass vacuously if the walk missed nested nodes: it must see these."""
    walked = {
        crd["spec"]["names"]["kind"]: {
            path for path, _ in properties(crd["spec"]["versions"][0]["schema"]["openAPIV3Schema"], "")
        }
        for crd in all_crds()
    }
    assert "spec.evaluation.gates[*].metric" in walked["FineTuneJob"]
    assert "status.conditions[*].reason" in walked["FineTuneJob"]
    assert "spec.serving.resources.requests" in walked["ModelDeployment"]
    assert "status.report.quality.after.perplexity" in walked["QuantizeJob"]
