"""What the operator tests put into the real API server and how they read it back.

Writes go through kubectl (server-side apply as the tests' field manager, or the very commands a user
types); reads go through one admin HTTP client, cheap enough to poll. :func:`wait_until` polls a read
until it holds, failing early if the operator has exited.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from typing import Any

import httpx

from realcluster.control_plane import FIELD_MANAGER, ControlPlane
from realcluster.operator_process import OperatorProcess

Manifest = dict[str, Any]

API_PATHS = {
    "finetunejobs": "/apis/kubetune.dev/v1alpha1",
    "quantizejobs": "/apis/kubetune.dev/v1alpha1",
    "modeldeployments": "/apis/kubetune.dev/v1alpha1",
    "deployments": "/apis/apps/v1",
    "horizontalpodautoscalers": "/apis/autoscaling/v2",
    "services": "/api/v1",
    "configmaps": "/api/v1",
}


def finetunejob(name: str) -> Manifest:
    return {
        "apiVersion": "kubetune.dev/v1alpha1",
        "kind": "FineTuneJob",
        "metadata": {"name": name},
        "spec": {"baseModel": {"uri": "/models/base"}, "dataset": {"uri": "/data/train.jsonl"}},
    }


def quantizejob(name: str, source: str) -> Manifest:
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


def modeldeployment(name: str, serving: Manifest | None = None) -> Manifest:
    spec: Manifest = {"versions": [{"name": "tuned", "model": {"uri": "hf://acme/tiny"}, "weight": 100}]}
    if serving is not None:
        spec["serving"] = serving
    return {
        "apiVersion": "kubetune.dev/v1alpha1",
        "kind": "ModelDeployment",
        "metadata": {"name": name},
        "spec": spec,
    }


def succeeded(obj: Manifest) -> bool:
    conditions = {c["type"]: c["status"] for c in (obj.get("status") or {}).get("conditions") or []}
    return conditions.get("Succeeded") == "True"


def exists(_: Manifest) -> bool:
    return True


class ClusterObjects:
    """Reads and writes of namespaced objects in one namespace, as the cluster's admin, while an operator
    runs (every wait fails early if it exits)."""

    def __init__(
        self, plane: ControlPlane, namespace: str, http: httpx.Client, operator: OperatorProcess
    ) -> None:
        self.plane = plane
        self.namespace = namespace
        self.http = http
        self.operator = operator

    def url(self, plural: str, name: str) -> str:
        return f"{API_PATHS[plural]}/namespaces/{self.namespace}/{plural}/{name}"

    def get(self, plural: str, name: str) -> Manifest | None:
        response = self.http.get(self.url(plural, name))
        if response.status_code == 404:
            return None
        response.raise_for_status()
        found: Manifest = response.json()
        return found

    def apply(self, manifest: Manifest) -> None:
        """Server-side apply, as ``kubectl apply --server-side`` (the tests' field manager)."""
        self.kubectl("apply", "--server-side", f"--field-manager={FIELD_MANAGER}", "-f", "-", stdin=manifest)

    def kubectl(self, *args: str, stdin: Manifest | None = None) -> str:
        """kubectl as admin in this namespace; its output."""
        text = None if stdin is None else json.dumps(stdin)
        output: str = self.plane.kubectl("-n", self.namespace, *args, stdin=text).stdout
        return output

    def wait_for(
        self, plural: str, name: str, condition: Callable[[Manifest], bool] = exists, what: str = ""
    ) -> Manifest:
        """The object once it exists and ``condition`` holds for it (``what`` says what is awaited)."""
        found: Manifest | None = None

        def holds() -> bool:
            nonlocal found
            found = self.get(plural, name)
            return found is not None and condition(found)

        wait_until(f"{plural}/{name}" + (f": {what}" if what else ""), holds, self.operator)
        assert found is not None
        return found

    def wait_gone(self, plural: str, name: str) -> None:
        wait_until(f"{plural}/{name} to be gone", lambda: self.get(plural, name) is None, self.operator)


def wait_until(
    description: str, holds: Callable[[], bool], operator: OperatorProcess, timeout_s: float = 120.0
) -> None:
    """Poll ``holds`` until it is true; fail at once if the operator exits, with its log after a timeout."""
    deadline = time.monotonic() + timeout_s
    while True:
        operator.check_running()
        if holds():
            return
        if time.monotonic() > deadline:
            raise AssertionError(
                f"timed out after {timeout_s:.0f}s waiting for {description}\n"
                f"--- operator log (tail)\n{operator.log()[-4000:]}"
            )
        time.sleep(0.3)
