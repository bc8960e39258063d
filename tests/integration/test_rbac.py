"""The rendered RBAC allows every API call the real operator makes, and grants nothing undeclared.

The operator (every module of kubetune.handlers.main.HANDLER_MODULES, with the settings `kubetune
operator` uses) runs jobs through their whole life against kmock's emulator, which logs every request.
Each request the operator made is turned into the (apiGroup, resource, verb) RBAC would check and
looked up in the chart's rendered ClusterRole (cluster-wide) or Role (one watched namespace). The other
direction: the rendered rules are exactly kubetune.kube.permissions' declaration.
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import helm_python as helm
import kmock
import kopf
import pytest
import yaml

from kubetune.config import OperatorConfig
from kubetune.handlers.main import HANDLER_MODULES, exact_namespaces
from kubetune.kube import permissions
from kubetune.reconcile.jobs import Backends

if TYPE_CHECKING:
    from fixtures.cluster import Cluster
    from fixtures.operator import OperatorRunner

os.environ.setdefault("KUBETUNE_RECONCILE_INTERVAL", "0.5")

REPO = Path(__file__).resolve().parents[2]
FAKE_STEPS = Path(__file__).parent / "fake_steps"
TEST_AGENT = "kubetune-integration-tests"  # the test's own requests, told apart from the operator's
Grant = tuple[str, str, str]
DISCOVERY_VERBS = {"GET"}


@pytest.fixture
def settings(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> OperatorConfig:
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([str(FAKE_STEPS), os.environ.get("PYTHONPATH", "")]))
    monkeypatch.setenv("FAKE_STEP_S", "0.05")
    return OperatorConfig(home=tmp_path, default_executor="local", reconcile_interval_s=0.5)


def rendered_rules(values: dict[str, Any]) -> list[list[dict[str, Any]]]:
    """The rules of every Role/ClusterRole the chart renders with `values`."""
    with helm.Chart.load(REPO / "charts" / "kubetune") as chart:
        rendered = chart.render(values, name="kubetune", namespace="kubetune-system")
    docs = [
        doc
        for name, text in rendered.items()
        if name.endswith(".yaml")
        for doc in yaml.safe_load_all(text)
        if doc
    ]
    return [doc["rules"] for doc in docs if doc["kind"] in ("Role", "ClusterRole")]


def grants_of(rules: Iterable[dict[str, Any]]) -> set[Grant]:
    return {
        (group, resource, verb)
        for rule in rules
        for group in rule["apiGroups"]
        for resource in rule["resources"]
        for verb in rule["verbs"]
    }


def needed(request: kmock.Request) -> Grant | None:
    """The RBAC check an API server makes for `request`; None for discovery (non-resource URLs)."""
    resource = request.resource
    if resource is None or not resource.plural:
        assert request.method.value in DISCOVERY_VERBS, f"unexpected non-resource call {request.url}"
        assert request.url.path in ("/api", "/apis", "/version") or request.url.path.startswith(
            ("/api/", "/apis/")
        ), f"unexpected non-resource call {request.url}"
        return None
    plural = f"{resource.plural}/{request.subresource}" if request.subresource else resource.plural
    match request.method.value:
        case "GET":
            reads = {kmock.action.WATCH: "watch", kmock.action.LIST: "list", kmock.action.FETCH: "get"}
            assert request.action in reads, f"unexpected GET {request.url}"
            verb = reads[request.action]
        case "POST":
            verb = "create"
        case "PATCH":
            verb = "patch"
        case "PUT":
            verb = "update"
        case "DELETE":
            verb = "delete" if request.name else "deletecollection"
        case other:
            raise AssertionError(f"unexpected method {other} in {request.url}")
    return (str(resource.group or ""), plural, verb)


def operator_calls(k8s: Cluster) -> list[kmock.Request]:
    return [r for r in list(k8s.emulator) if r.headers.get("User-Agent") != TEST_AGENT]


def job(name: str, **spec: Any) -> dict[str, Any]:
    body: dict[str, Any] = {
        "apiVersion": "kubetune.dev/v1alpha1",
        "kind": "FineTuneJob",
        "metadata": {"name": name},
        "spec": {"baseModel": {"uri": "/models/base"}, "dataset": {"uri": "/data/train.jsonl"}},
    }
    body["spec"].update(spec)
    return body


def quantize(name: str, source: str) -> dict[str, Any]:
    return {
        "apiVersion": "kubetune.dev/v1alpha1",
        "kind": "QuantizeJob",
        "metadata": {"name": name},
        "spec": {
            "model": {"fineTuneJobRef": {"name": source}},
            "method": {"type": "int8-weight-only"},
            "evaluation": {"gates": [{"metric": "sizeRatio", "max": "0.5"}]},
        },
    }


def finished(obj: dict[str, Any]) -> bool:
    return any(c["type"] == "Succeeded" and c["status"] != "Unknown" for c in obj["status"]["conditions"])


async def exercise(k8s: Cluster) -> None:
    """Jobs through their whole life (success, a dependent job, an invalid spec, a deletion mid-run), and a
    ModelDeployment that creates its children and is deleted."""
    deployment = {"versions": [{"name": "tuned", "model": {"uri": "hf://acme/tiny"}, "weight": 100}]}
    await k8s.create("modeldeployments", {"metadata": {"name": "bot"}, "spec": deployment})
    await k8s.create("quantizejobs", quantize("base-int8", "base"))  # waits for its source first
    await k8s.create("finetunejobs", job("base"))
    await k8s.create("finetunejobs", job("bad", training={"learningRate": "fast"}))
    await k8s.wait_for("finetunejobs", "base", finished, timeout=60)
    await k8s.wait_for("quantizejobs", "base-int8", finished, timeout=60)
    await k8s.wait_for("finetunejobs", "bad", lambda o: "conditions" in o.get("status", {}), timeout=30)
    await k8s.create("finetunejobs", job("doomed"))
    await k8s.wait_for("finetunejobs", "doomed", lambda o: "pipelineRun" in o["status"], timeout=30)
    await k8s.delete("finetunejobs", "doomed")
    await k8s.wait_gone("finetunejobs", "doomed", timeout=30)
    for kind, name in (
        ("deployments", "bot-tuned"),
        ("services", "bot-tuned"),
        ("configmaps", "bot-gateway"),
    ):
        await k8s.wait_for(kind, name, timeout=30)
    await k8s.wait_for("modeldeployments", "bot", lambda o: "conditions" in o.get("status", {}), timeout=30)
    await k8s.delete("modeldeployments", "bot")
    await k8s.wait_gone("modeldeployments", "bot", timeout=30)


@pytest.mark.parametrize("scope", ["clusterwide", "namespaced"])
async def test_every_operator_call_is_allowed_and_every_rule_is_declared(
    k8s: Cluster, run_operator: OperatorRunner, settings: OperatorConfig, scope: str
) -> None:
    namespaces = [] if scope == "clusterwide" else ["default"]

    def like_kubetune_operator(kopf_settings: kopf.OperatorSettings) -> None:
        # As kubetune.handlers.main: cluster-wide, Kopf scans for CRDs; with exact namespaces, not.
        kopf_settings.scanning.disabled = exact_namespaces(namespaces)

    k8s.session.headers["User-Agent"] = TEST_AGENT
    memo = kopf.Memo(backends=Backends(settings))
    async with run_operator(
        *HANDLER_MODULES, namespaces=namespaces, memo=memo, configure=like_kubetune_operator
    ):
        await exercise(k8s)

    values: dict[str, Any] = {"watchNamespaces": namespaces}
    (rules,) = rendered_rules(values) if namespaces else rendered_rules({})
    allowed = grants_of(rules)
    calls = operator_calls(k8s)
    made = {grant for grant in map(needed, calls) if grant is not None}
    assert made - allowed == set(), f"calls the {scope} RBAC forbids"
    if namespaces:  # a Role grants nothing outside its namespace, nor anything cluster-scoped
        outside = [r.url.path for r in calls if needed(r) is not None and r.namespace != "default"]
        assert outside == []
    # The run did reach the parts of the code the rules are for (not a vacuous pass).
    assert {
        ("kubetune.dev", "finetunejobs", "watch"),
        ("kubetune.dev", "finetunejobs", "patch"),
        ("kubetune.dev", "finetunejobs/status", "patch"),
        ("kubetune.dev", "quantizejobs/status", "patch"),
        ("kubetune.dev", "modeldeployments/status", "patch"),
        ("apps", "deployments", "patch"),
        ("apps", "deployments", "watch"),
        ("", "configmaps", "patch"),
        ("", "events", "create"),
    } <= made
    if not namespaces:
        assert ("apiextensions.k8s.io", "customresourcedefinitions", "watch") in made

    # Nothing more: the rendered rules are the code's declaration, exactly.
    assert allowed == permissions.grants(clusterwide=not namespaces)
