"""The pod of a group of LoRA versions sharing a base model, run from the spec the operator renders
(kubetune.kube.adapter_group) in the sandbox of harness.py.

Two versions' adapters on one claim, their base on another: the pod's own command serves both from one
process, under ``/adapters/<version>``, with every probe path of the rendered spec answering; when the
group's ConfigMap changes (the test plays the kubelet, rewriting the mounted file), the running server
unloads the version that left without a restart.
"""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path

import httpx
import pytest

from kubetune.api.validation import parse_resource
from kubetune.kube.adapter_group import ADAPTERS_KEY, adapters_since, build_group_children
from kubetune.kube.children import SERVING_PORT, ChildImages
from kubetune.plan.versions import DeploymentRef, VersionServing, serving_env
from kubetune_contract.deployment import ModelDeployment
from sandbox.harness import SandboxCluster, iter_probe_paths, pod_spec_of, wait_until_answers

pytestmark = pytest.mark.slow

REF = DeploymentRef(name="support-bot", namespace="team-a", uid="6f1d2a4e-1c0b-4f7e-9d55-2b7a9c3e8f10")
IMAGES = ChildImages(serving="ghcr.io/kubetune/serving:0.1.0", gateway="ghcr.io/kubetune/operator:0.1.0")
BASE = "pvc://models/tiny-base"
VERSIONS = ("tuned", "tuned-2")
SERVER_READY_S = 240  # loading torch and the model on a loaded two-core machine


def publish_adapters(cluster: SandboxCluster, adapter: Path, base: Path) -> None:
    """Each version's copy of the adapter on claim ``artifacts``, its base (as its manifest says) on
    claim ``models``."""
    shutil.copytree(base, cluster.claim("models") / "tiny-base")
    for version in VERSIONS:
        published = cluster.claim("artifacts") / "support-bot" / version
        shutil.copytree(adapter, published)
        manifest_path = published / "kubetune-manifest.json"
        manifest = json.loads(manifest_path.read_text(encoding="utf-8"))
        manifest["baseModel"] = {"uri": BASE, "kind": "local"}
        manifest_path.write_text(json.dumps(manifest), encoding="utf-8")


def members() -> list[VersionServing]:
    document = {
        "apiVersion": "kubetune.dev/v1alpha1",
        "kind": "ModelDeployment",
        "metadata": {"name": REF.name, "namespace": REF.namespace, "uid": REF.uid, "generation": 1},
        "spec": {
            "versions": [
                {"name": version, "model": {"uri": f"pvc://artifacts/support-bot/{version}"}, "weight": 50}
                for version in VERSIONS
            ],
            "generation": {"defaults": {"temperature": "0", "maxTokens": 4}},
        },
    }
    deployment = parse_resource(document, ModelDeployment)
    return [
        VersionServing(
            name=version,
            model_uri=f"pvc://artifacts/support-bot/{version}",
            bento=f"{REF.name}-{version}",
            env=serving_env(deployment, version),
            serving=deployment.spec.serving,
            base_model_uri=BASE,
            lora_adapter=True,
        )
        for version in VERSIONS
    ]


def loaded(port: int) -> list[str]:
    listed: list[str] = httpx.get(f"http://127.0.0.1:{port}/adapters", timeout=10).json()["adapters"]
    return listed


def test_the_group_pod_serves_each_version_under_its_prefix_and_follows_its_config_map(
    cluster: SandboxCluster, hub_adapter: Path, tiny_model: Path
) -> None:
    publish_adapters(cluster, hub_adapter, tiny_model)
    group = members()
    since = adapters_since(group, None, time.time())
    config_map, server, *_ = build_group_children(REF, BASE, group, IMAGES, since)
    cluster.apply(config_map)
    pod_spec = pod_spec_of(server)
    pod = cluster.run_pod("adapters", pod_spec)
    port = cluster.port_forward(SERVING_PORT)

    probes = dict(iter_probe_paths(pod_spec["containers"][0]))
    assert set(probes) == {"startupProbe", "livenessProbe", "readinessProbe"}
    wait_until_answers(f"http://127.0.0.1:{port}{probes['readinessProbe']}", pod, SERVER_READY_S)
    for kind, path in probes.items():
        assert httpx.get(f"http://127.0.0.1:{port}{path}", timeout=10).status_code == 200, kind
    assert loaded(port) == sorted(VERSIONS)
    for version in VERSIONS:
        answer = httpx.post(
            f"http://127.0.0.1:{port}/adapters/{version}/v1/completions",
            json={"model": REF.name, "prompt": "ticket about billing", "max_tokens": 3, "temperature": 0},
            timeout=120,
        )
        assert answer.status_code == 200, answer.text
        assert answer.headers["x-kubetune-version"] == version

    # the kubelet refreshes the mounted ConfigMap once tuned-2 left the group
    mounted = pod.directory / "volumes" / "adapters" / ADAPTERS_KEY
    mounted.write_text(json.dumps({"tuned": "/mnt/pvc/artifacts/support-bot/tuned"}), encoding="utf-8")
    deadline = time.monotonic() + 60
    while loaded(port) != ["tuned"]:
        assert time.monotonic() < deadline, (
            f"still loaded: {loaded(port)}\n{pod.container('serve').output()[-3000:]}"
        )
        time.sleep(0.5)
    assert httpx.get(f"http://127.0.0.1:{port}/adapters/tuned-2/readyz", timeout=10).status_code == 503
    assert httpx.get(f"http://127.0.0.1:{port}/readyz", timeout=10).status_code == 200  # never restarted
