"""The RBAC rules the operator needs, derived from the code rather than written by hand.

Three sources, nothing else:

* the resource registry (``kubetune.api.registry``): every kubetune kind is listed, watched and patched
  by Kopf (handlers, indexes, finalizers, progress annotations), its ``/status`` patched with the
  planned status; ``get`` adds nothing a list does not already show, and lets handlers read one object;
* :data:`CHILD_RESOURCES`: the objects the ModelDeployment handlers build (``kubetune.kube``) and apply
  with server-side apply, owned by their ModelDeployment;
* what Kopf itself calls (kopf/_core/engines/posting.py, kopf/_core/reactor/observation.py): it posts
  core v1 Events (create); cluster-wide, it lists and watches CustomResourceDefinitions to notice
  kubetune's CRDs appearing (``settings.scanning``). With exact ``--namespace`` names the operator
  disables scanning (``kubetune.handlers.main``), so a namespaced install needs no cluster-scoped rule.
  Kopf only lists/watches Namespaces for namespace *patterns*, which the chart does not offer.

It also lists Pods (:data:`OBSERVED_GRANTS`, read-only): a version's init container that fails on a
model that can never be served says so in its termination message, which the kube serving backend
reads to stall the ModelDeployment with ModelInvalid at once instead of crash-looping.

The operator reads no Secrets: a model's token secret is mounted into pipeline pods by Kubeflow
Pipelines, not read by the operator. Nor can it grant reading one (RBAC lets nobody grant what it does
not hold), so the Role that lets a gateway watch its own key Secret (:data:`GATEWAY_KEY_SECRET_VERBS`
on that one name, :func:`gateway_key_secret_rules`) is created with the Secret by ``kubetune keys``,
run by someone who may manage Secrets (:mod:`kubetune.kube.gateway_access`).
``scripts/render_manifests.py`` writes :func:`rules_document` into the Helm chart
(charts/kubetune/files/rbac-rules.yaml) and thereby into manifests/; its ``--check`` mode fails when
that copy is stale.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any, Final

from kubetune.api.definition import ResourceDefinition
from kubetune.api.registry import all_definitions

Grant = tuple[str, str, str]  # (apiGroup, resource or resource/subresource, verb)

SERVER_SIDE_APPLY_VERBS: Final = ("get", "list", "watch", "create", "patch", "delete")


@dataclass(frozen=True)
class ChildResource:
    """A kind of object the operator creates and owns on behalf of a kubetune resource."""

    group: str  # "" for the core API
    version: str
    plural: str
    kind: str
    owner_kind: str
    verbs: tuple[str, ...] = SERVER_SIDE_APPLY_VERBS
    from_addon: bool = False
    """The kind comes from an add-on's CRD (KEDA's ScaledObject) that a cluster may not have: listing it
    there finds nothing instead of failing."""

    @property
    def api_version(self) -> str:
        return f"{self.group}/{self.version}" if self.group else self.version


# What a ModelDeployment owns: one Deployment + Service per version, the gateway's Deployment, Service,
# ServiceAccount, ConfigMap (gateway.json) and PodDisruptionBudget, the NetworkPolicy of its version
# pods, and an optional HorizontalPodAutoscaler (or KEDA ScaledObject) per version. The ModelDeployment
# child builders import this to know what they may create; add a kind here and the rendered RBAC follows.
_OWNER = "ModelDeployment"
CHILD_RESOURCES: Final[tuple[ChildResource, ...]] = (
    ChildResource("apps", "v1", "deployments", "Deployment", owner_kind=_OWNER),
    ChildResource("", "v1", "services", "Service", owner_kind=_OWNER),
    ChildResource("", "v1", "configmaps", "ConfigMap", owner_kind=_OWNER),
    ChildResource(
        "autoscaling", "v2", "horizontalpodautoscalers", "HorizontalPodAutoscaler", owner_kind=_OWNER
    ),
    # one per deployment: only its gateway (and metrics scrapers) reach its version pods
    ChildResource("networking.k8s.io", "v1", "networkpolicies", "NetworkPolicy", owner_kind=_OWNER),
    ChildResource("policy", "v1", "poddisruptionbudgets", "PodDisruptionBudget", owner_kind=_OWNER),
    # a version with minReplicas 0 scales on KEDA (kubetune.kube.children.build_version_scaled_object)
    ChildResource("keda.sh", "v1alpha1", "scaledobjects", "ScaledObject", owner_kind=_OWNER, from_addon=True),
    # the gateway pods' identity, which `kubetune keys` binds to the Role of their key Secret
    ChildResource("", "v1", "serviceaccounts", "ServiceAccount", owner_kind=_OWNER),
)

KOPF_NAMESPACED_GRANTS: Final[tuple[Grant, ...]] = (("", "events", "create"),)
# Read-only: the version pods' init-container termination messages (kubetune.kube.serving).
OBSERVED_GRANTS: Final[tuple[Grant, ...]] = (("", "pods", "list"),)
KOPF_CLUSTER_GRANTS: Final[tuple[Grant, ...]] = (
    ("apiextensions.k8s.io", "customresourcedefinitions", "list"),
    ("apiextensions.k8s.io", "customresourcedefinitions", "watch"),
)

# What a gateway may do with its own key Secret, and with nothing else: read it and watch it change.
GATEWAY_KEY_SECRET_VERBS: Final = ("get", "list", "watch")


def gateway_key_secret_rules(secret_name: str) -> list[dict[str, Any]]:
    """The rules of a gateway's Role: its key Secret, by name. A list or watch is allowed only with the
    field selector ``metadata.name=<secret_name>``, which is how the gateway watches it."""
    return [
        {
            "apiGroups": [""],
            "resources": ["secrets"],
            "resourceNames": [secret_name],
            "verbs": list(GATEWAY_KEY_SECRET_VERBS),
        }
    ]


# Kubernetes' conventional verb order, for readable rules.
_VERB_ORDER: Final = ("get", "list", "watch", "create", "update", "patch", "delete")


def kind_grants(definition: ResourceDefinition) -> list[Grant]:
    group, plural = definition.group, definition.plural
    grants = [(group, plural, verb) for verb in ("get", "list", "watch", "patch")]
    if definition.status_model is not None:
        grants.append((group, f"{plural}/status", "patch"))
    return grants


def child_grants(children: Iterable[ChildResource], owners: Iterable[ResourceDefinition]) -> list[Grant]:
    """The children's verbs, plus ``update`` on each owner's ``finalizers`` subresource.

    Children carry ``ownerReferences`` with ``blockOwnerDeletion: true`` (Kopf's ``adopt`` default);
    the OwnerReferencesPermissionEnforcement admission plugin only allows that to whoever may update
    the owner's finalizers.
    """
    by_kind = {owner.kind: owner for owner in owners}
    grants: list[Grant] = []
    for child in children:
        owner = by_kind.get(child.owner_kind)
        if owner is None:
            raise ValueError(f"CHILD_RESOURCES: {child.kind} is owned by unknown kind {child.owner_kind!r}")
        grants += [(child.group, child.plural, verb) for verb in child.verbs]
        grants.append((owner.group, f"{owner.plural}/finalizers", "update"))
    return grants


def grants(
    clusterwide: bool,
    definitions: Iterable[ResourceDefinition] | None = None,
    children: Iterable[ChildResource] = CHILD_RESOURCES,
) -> set[Grant]:
    """Every (apiGroup, resource, verb) the operator needs, cluster-wide or in one watched namespace."""
    kinds = list(all_definitions() if definitions is None else definitions)
    result = {grant for definition in kinds for grant in kind_grants(definition)}
    result |= set(child_grants(children, kinds))
    result |= set(KOPF_NAMESPACED_GRANTS)
    result |= set(OBSERVED_GRANTS)
    if clusterwide:
        result |= set(KOPF_CLUSTER_GRANTS)
    return result


def rules(granted: Iterable[Grant]) -> list[dict[str, Any]]:
    """RBAC PolicyRules: one per API group and verb set, resources sorted; deterministic order."""
    verbs_by_resource: dict[tuple[str, str], set[str]] = {}
    for group, resource, verb in granted:
        if "*" in (group + resource + verb):
            raise ValueError(f"no wildcards in RBAC rules: {(group, resource, verb)}")
        verbs_by_resource.setdefault((group, resource), set()).add(verb)
    resources_by_rule: dict[tuple[str, tuple[str, ...]], list[str]] = {}
    for (group, resource), verbs in verbs_by_resource.items():
        ordered = tuple(sorted(verbs, key=lambda v: (_VERB_ORDER.index(v) if v in _VERB_ORDER else 99, v)))
        resources_by_rule.setdefault((group, ordered), []).append(resource)
    return [
        {"apiGroups": [group], "resources": sorted(resources), "verbs": list(verbs)}
        for (group, verbs), resources in sorted(resources_by_rule.items())
    ]


def rules_document() -> dict[str, list[dict[str, Any]]]:
    """What the chart includes: the rules of a namespaced Role, and the extra ones cluster-wide."""
    namespaced = grants(clusterwide=False)
    return {
        "namespaced": rules(namespaced),
        "clusterwide": rules(grants(clusterwide=True) - namespaced),
    }
