"""The generated CRDs on a real kube-apiserver: they install, their CEL rules refuse what ``kubetune
validate`` refuses with the same field path and words, the server's defaulting fills in exactly the
pydantic models' defaults, and ``kubectl get`` prints the printer columns."""

from __future__ import annotations

import copy
import json
import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from lightkube import Client, KubeConfig
from lightkube.resources.apiextensions_v1 import CustomResourceDefinition

from kubetune.api.definition import ResourceDefinition
from kubetune.api.registry import all_definitions, get_definition
from kubetune.api.validation import parse_resource, read_manifests, validate_documents
from kubetune.local.store import ApplyError, LocalStore
from realcluster.control_plane import FIELD_MANAGER, ControlPlane

pytestmark = pytest.mark.realcluster

REPO = Path(__file__).resolve().parents[2]
QUICKSTART = REPO / "examples" / "quickstart"
Manifest = dict[str, Any]


def quickstart(kind: str) -> Manifest:
    """The quickstart's manifest of ``kind`` (a fresh copy)."""
    (found,) = [doc for doc in read_manifests(QUICKSTART) if doc["kind"] == kind]
    return copy.deepcopy(found)


def in_namespace(doc: Manifest, namespace: str) -> Manifest:
    doc = copy.deepcopy(doc)
    doc["metadata"]["namespace"] = namespace
    return doc


def apply(plane: ControlPlane, doc: Manifest, *, check: bool = True) -> tuple[int, str]:
    """Server-side apply of one document as kubectl does it: (exit status, kubectl's stderr)."""
    result = plane.kubectl(
        "apply",
        "--server-side",
        f"--field-manager={FIELD_MANAGER}",
        "-f",
        "-",
        stdin=json.dumps(doc),
        check=check,
    )
    return result.returncode, result.stderr


def stored(plane: ControlPlane, doc: Manifest) -> Manifest:
    meta = doc["metadata"]
    definition = get_definition(doc["kind"])
    out = plane.kubectl("get", definition.crd_name, meta["name"], "-n", meta["namespace"], "-o", "json")
    result: Manifest = json.loads(out.stdout)
    return result


# -- the CRDs install ---------------------------------------------------------------------------------


def test_crds_apply_server_side_and_are_established(
    control_plane: ControlPlane, kubetune_crds: list[str]
) -> None:
    client = Client(config=KubeConfig.from_file(control_plane.kubeconfig))
    assert kubetune_crds == sorted(d.crd_name for d in all_definitions())
    for name in kubetune_crds:
        crd = client.get(CustomResourceDefinition, name)
        assert crd.status is not None and crd.status.conditions is not None
        conditions = {c.type: c.status for c in crd.status.conditions}
        assert conditions["Established"] == "True", name
        assert conditions["NamesAccepted"] == "True", name
        assert crd.metadata is not None and crd.metadata.managedFields is not None
        appliers = {(f.manager, f.operation) for f in crd.metadata.managedFields}
        assert (FIELD_MANAGER, "Apply") in appliers, appliers
    # Applying the same files again changes nothing.
    again = control_plane.kubectl(
        "apply", "--server-side", f"--field-manager={FIELD_MANAGER}", "-f", str(REPO / "manifests" / "crds")
    )
    assert again.stdout.count("serverside-applied") == len(kubetune_crds)


def test_authorization_is_rbac(control_plane: ControlPlane, kubetune_crds: list[str], namespace: str) -> None:
    """A ServiceAccount bound to nothing may not even list jobs: the API server enforces RBAC."""
    nobody = control_plane.service_account_kubeconfig(namespace, "nobody")
    result = control_plane.kubectl("get", "finetunejobs", "-n", namespace, kubeconfig=nobody, check=False)
    assert result.returncode != 0
    assert f'"system:serviceaccount:{namespace}:nobody" cannot list resource "finetunejobs"' in result.stderr


# -- the CEL rules refuse what kubetune validate refuses ----------------------------------------------


@dataclass(frozen=True)
class Refusal:
    kind: str
    change: Callable[[Manifest], None]
    path: str  # the field both name
    rule: str  # the CEL rule's message, which the API server prints
    validate_says: str  # what `kubetune validate` prints for the same document, after the path


def _set(path: str, value: Any) -> Callable[[Manifest], None]:
    def change(doc: Manifest) -> None:
        *parents, leaf = path.split(".")
        node: Any = doc
        for part in parents:
            node = node[int(part)] if part.isdigit() else node[part]
        node[leaf] = value

    return change


REFUSALS = {
    "curation minTokens > maxTokens": Refusal(
        "FineTuneJob",
        _set("spec.dataset.curation", {"minTokens": 4096}),  # maxTokens defaults to 2048
        "spec.dataset.curation",
        "minTokens must not exceed maxTokens",
        "minTokens must not exceed maxTokens",
    ),
    "stickyBy header without header": Refusal(
        "ModelDeployment",
        _set("spec.routing", {"stickyBy": "header"}),
        "spec.routing",
        "header is required when stickyBy is header",
        "header is required when stickyBy is header",
    ),
    "weights not summing to 100": Refusal(
        "ModelDeployment",
        _set("spec.versions.1.weight", 30),
        "spec",
        "versions weights must sum to 100",
        "versions weights must sum to 100, got 110",
    ),
    "a method block of another type": Refusal(
        "FineTuneJob",
        _set("spec.method", {"type": "full", "lora": {"r": 4}}),
        "spec.method",
        "method.lora may only be set when method.type is lora",
        "lora is set but type is 'full'; only full may be set",
    ),
    "a quantize target the method does not support": Refusal(
        "QuantizeJob",
        _set("spec.method", {"type": "mixed-precision", "mixedPrecision": {"dtype": "fp16"}}),
        "spec",
        "mixed-precision fp16 does not support target cpu; use bf16",
        "mixed-precision fp16 does not support target cpu; use bf16",
    ),
}


@pytest.mark.parametrize("case", list(REFUSALS))
def test_the_api_server_refuses_what_kubetune_validate_refuses(
    control_plane: ControlPlane, kubetune_crds: list[str], namespace: str, case: str
) -> None:
    refusal = REFUSALS[case]
    doc = in_namespace(quickstart(refusal.kind), namespace)
    refusal.change(doc)

    offline = [(issue.path, issue.message) for issue in validate_documents([doc])]
    assert offline == [(refusal.path, refusal.validate_says)]

    status, server_says = apply(control_plane, doc, check=False)
    assert status != 0
    assert "is invalid" in server_says
    assert f"{refusal.path}: Invalid value" in server_says, server_says
    assert refusal.rule in server_says, server_says


def test_a_job_spec_is_immutable_there_as_in_local_mode(
    control_plane: ControlPlane, kubetune_crds: list[str], namespace: str, tmp_path: Path
) -> None:
    doc = in_namespace(quickstart("FineTuneJob"), namespace)
    changed = copy.deepcopy(doc)
    changed["spec"]["training"]["epochs"] = 5

    apply(control_plane, doc)
    status, server_says = apply(control_plane, changed, check=False)
    assert status != 0
    assert "spec: Invalid value" in server_says, server_says
    assert "spec is immutable; create a new FineTuneJob" in server_says, server_says

    store = LocalStore(tmp_path)
    definition = get_definition("FineTuneJob")
    store.apply(definition.plural, doc, immutable_spec=definition.immutable_spec)
    with pytest.raises(ApplyError, match="spec: spec is immutable"):
        store.apply(definition.plural, changed, immutable_spec=definition.immutable_spec)


# -- valid manifests: accepted, and defaulted as the models default -----------------------------------


@pytest.fixture(scope="module")
def quickstart_namespace(control_plane: ControlPlane, kubetune_crds: list[str]) -> str:
    """The quickstart's three resources, applied into a namespace of their own."""
    namespace = control_plane.create_namespace()
    for kind in ("FineTuneJob", "QuantizeJob", "ModelDeployment"):
        apply(control_plane, in_namespace(quickstart(kind), namespace))
    return namespace


@pytest.mark.parametrize("kind", ["FineTuneJob", "QuantizeJob", "ModelDeployment"])
def test_the_api_server_fills_in_the_models_defaults(
    control_plane: ControlPlane, quickstart_namespace: str, kind: str
) -> None:
    doc = in_namespace(quickstart(kind), quickstart_namespace)
    spec = stored(control_plane, doc)["spec"]
    model = parse_resource(doc)
    expected = model.model_dump(mode="json", by_alias=True, exclude_none=True)["spec"]
    assert spec == expected
    assert spec != doc["spec"]  # the quickstart leaves defaults out: the server wrote them


def test_a_rollout_on_timing_alone_is_accepted(
    control_plane: ControlPlane, kubetune_crds: list[str], namespace: str
) -> None:
    """``analysis: {skip: true}`` leaves metrics out; the rule ``size(self.metrics) == 0`` reads the
    schema's ``[]`` default (without it the API server reports "no such key: metrics")."""
    doc = in_namespace(quickstart("ModelDeployment"), namespace)
    doc["spec"]["rollout"] = {"steps": [{"weight": 10, "pause": "1m"}], "analysis": {"skip": True}}
    assert validate_documents([doc]) == []
    apply(control_plane, doc)
    assert stored(control_plane, doc)["spec"]["rollout"]["analysis"]["metrics"] == []


# -- kubectl get prints the printer columns -----------------------------------------------------------


def _headers(table: str) -> list[list[str]]:
    """The header row of each table kubectl printed (columns are separated by two or more spaces)."""
    return [re.split(r"\s{2,}", line.strip()) for line in table.splitlines() if line.startswith("NAME")]


def _columns(definition: ResourceDefinition, *, wide: bool) -> list[str]:
    return ["NAME"] + [
        column.name.upper() for column in definition.printer_columns if wide or column.priority == 0
    ]


def test_kubectl_get_kubetune_prints_every_kinds_columns(
    control_plane: ControlPlane, quickstart_namespace: str
) -> None:
    table = control_plane.kubectl("get", "kubetune", "-n", quickstart_namespace).stdout
    assert sorted(_headers(table)) == sorted(_columns(d, wide=False) for d in all_definitions())
    assert _columns(get_definition("FineTuneJob"), wide=False) == [
        "NAME",
        "STATUS",
        "PROGRESS %",
        "BASE MODEL",
        "AGE",
    ]


def test_kubectl_get_ftj_wide_prints_the_wide_columns(
    control_plane: ControlPlane, quickstart_namespace: str
) -> None:
    table = control_plane.kubectl("get", "ftj", "-o", "wide", "-n", quickstart_namespace).stdout
    assert _headers(table) == [
        ["NAME", "STATUS", "PROGRESS %", "BASE MODEL", "AGE", "METHOD", "EVAL LOSS", "OUTPUT", "REASON"]
    ]
    assert "support-router" in table and "./.kubetune/models/tiny-base" in table and "lora" in table
