"""A ModelDeployment's pods, run from the specs the operator renders (kubetune.kube.children).

Each pod runs in the sandbox of harness.py: root filesystem read-only, only the declared volume mounts
writable, the user of the pod's securityContext, no internet (a hub base model comes from a mirror on
the pod network, as ``HF_ENDPOINT``). The init container builds the Bento from the model, the server
answers on its port, every probe path of the rendered spec answers, and the gateway pod routes to it.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import httpx
import pytest

from kubetune.api.validation import parse_resource
from kubetune.kube.children import (
    GATEWAY_PORT,
    SERVING_PORT,
    ChildImages,
    build_gateway_children,
    build_version_children,
    version_child_name,
    version_url,
)
from kubetune.plan.gateway import gateway_config
from kubetune.plan.versions import DeploymentRef, VersionServing, serving_env
from kubetune_contract.common import SecretKeyRef
from kubetune_contract.deployment import ModelDeployment
from sandbox.harness import (
    PodFailed,
    RunningPod,
    SandboxCluster,
    iter_probe_paths,
    pod_spec_of,
    wait_until_answers,
)
from sandbox.hub_mirror import TINY_BASE_REPO

pytestmark = pytest.mark.slow

NAMESPACE = "team-a"
REF = DeploymentRef(name="support-bot", namespace=NAMESPACE, uid="0b4c7a52-9d7e-4d5c-8c36-4c1f0d9a1e01")
# The images the chart sets (servingImage, the operator's for the gateway); the sandbox stands each in
# by its Dockerfile in manifests/images.
IMAGES = ChildImages(serving="ghcr.io/kubetune/serving:0.1.0", gateway="ghcr.io/kubetune/operator:0.1.0")
MIRROR_PORT = 5000
HUB_ENV = {"HF_ENDPOINT": f"http://127.0.0.1:{MIRROR_PORT}"}  # the internet, stood in by the mirror
HUB_SECRET = "hf-token"
HUB_TOKEN = "hf_sandbox"
HUB_TOKEN_REF = SecretKeyRef(name=HUB_SECRET, key="token")  # the version's model.tokenSecretRef
SERVER_READY_S = 240  # loading torch and the model on a loaded two-core machine


def model_deployment(model_uri: str) -> ModelDeployment:
    document = {
        "apiVersion": "kubetune.dev/v1alpha1",
        "kind": "ModelDeployment",
        "metadata": {"name": REF.name, "namespace": NAMESPACE, "uid": REF.uid, "generation": 1},
        "spec": {
            "versions": [{"name": "tuned", "model": {"uri": model_uri}, "weight": 100}],
            "generation": {"defaults": {"temperature": "0", "maxTokens": 4}},
            # No API keys here: the gateway lets requests through (the access tests cover keys).
            "access": {"auth": "disabled"},
        },
    }
    return parse_resource(document, ModelDeployment)


def version_serving(
    deployment: ModelDeployment,
    model_uri: str,
    token_secret: SecretKeyRef | None = None,
    base_model_uri: str | None = None,
) -> VersionServing:
    return VersionServing(
        name="tuned",
        model_uri=model_uri,
        bento=f"{REF.name}-tuned",
        env=serving_env(deployment, "tuned"),
        serving=deployment.spec.serving,
        token_secret=token_secret,
        base_model_uri=base_model_uri,
    )


def serving_container(pod_spec: Mapping[str, Any]) -> Mapping[str, Any]:
    container: Mapping[str, Any] = pod_spec["containers"][0]
    return container


def start_version(
    cluster: SandboxCluster,
    model_uri: str,
    extra_env: Mapping[str, str] | None = None,
    token_secret: SecretKeyRef | None = None,
    base_model_uri: str | None = None,
) -> tuple[RunningPod, Mapping[str, Any], int]:
    """The version's Deployment rendered and its pod run: (pod, pod spec, forwarded serving port)."""
    deployment = model_deployment(model_uri)
    version = version_serving(deployment, model_uri, token_secret, base_model_uri)
    server = build_version_children(REF, version, IMAGES)[0]
    pod_spec = pod_spec_of(server)
    pod = cluster.run_pod("version-tuned", pod_spec, extra_env=extra_env)
    return pod, pod_spec, cluster.port_forward(SERVING_PORT)


def assert_serves(pod: RunningPod, pod_spec: Mapping[str, Any], port: int) -> None:
    """Every httpGet probe path of the rendered container answers 200, and a completion comes back."""
    container = serving_container(pod_spec)
    assert {port["containerPort"] for port in container["ports"]} == {SERVING_PORT}
    probes = dict(iter_probe_paths(container))
    assert set(probes) == {"startupProbe", "livenessProbe", "readinessProbe"}
    wait_until_answers(f"http://127.0.0.1:{port}{probes['readinessProbe']}", pod, SERVER_READY_S)
    for kind, path in probes.items():
        assert httpx.get(f"http://127.0.0.1:{port}{path}", timeout=10).status_code == 200, kind
    completion = httpx.post(
        f"http://127.0.0.1:{port}/v1/completions",
        json={"model": REF.name, "prompt": "ticket about billing", "max_tokens": 3, "temperature": 0},
        timeout=120,
    )
    assert completion.status_code == 200, completion.text
    assert completion.json()["usage"]["completion_tokens"] >= 1


@pytest.fixture
def hub_mirror(cluster: SandboxCluster, tiny_model: Path, tmp_path: Path) -> Iterator[Path]:
    """The hub on the pod network, serving ``tiny_model`` as TINY_BASE_REPO to whoever sends HUB_TOKEN;
    yields its request log."""
    log = tmp_path / "mirror.log"
    mirror = Path(__file__).with_name("hub_mirror.py")
    with log.open("wb") as out:
        process = cluster.run_in_network(
            [
                sys.executable,
                str(mirror),
                "--port",
                str(MIRROR_PORT),
                "--repo",
                f"{TINY_BASE_REPO}={tiny_model}",
                "--token",
                HUB_TOKEN,
            ],
            stdout=out,
            stderr=subprocess.STDOUT,
        )
    try:
        forwarded = cluster.port_forward(MIRROR_PORT)
        wait_for_mirror(f"http://127.0.0.1:{forwarded}/api/models/{TINY_BASE_REPO}/revision/main", process)
        cluster.apply(
            {"kind": "Secret", "metadata": {"name": HUB_SECRET}, "stringData": {"token": HUB_TOKEN}}
        )
        yield log
    finally:
        process.terminate()
        process.wait(timeout=10)


def wait_for_mirror(url: str, process: subprocess.Popen[bytes]) -> None:
    for _ in range(100):
        assert process.poll() is None, "the hub mirror exited"
        try:
            if httpx.get(url, headers={"Authorization": f"Bearer {HUB_TOKEN}"}, timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.1)
    raise AssertionError(f"the hub mirror did not answer {url}")


def test_a_lora_adapter_on_a_claim_whose_base_is_on_the_hub_is_served(
    cluster: SandboxCluster, hub_adapter: Path, hub_mirror: Path
) -> None:
    """The base is downloaded into HF_HOME by the init container: it must be a mounted volume even
    though the adapter itself is on a claim (the root filesystem is read-only)."""
    shutil.copytree(hub_adapter, cluster.claim("artifacts") / "support-bot" / "v1")
    pod, pod_spec, port = start_version(cluster, "pvc://artifacts/support-bot/v1", HUB_ENV, HUB_TOKEN_REF)
    fetched = hub_mirror.read_text(encoding="utf-8")
    assert f"GET /{TINY_BASE_REPO}/resolve/" in fetched and "model.safetensors" in fetched
    assert_serves(pod, pod_spec, port)


def test_a_hub_model_is_built_into_a_bento_by_the_init_container_with_the_token_secret(
    cluster: SandboxCluster, hub_mirror: Path
) -> None:
    deployment = model_deployment(f"hf://{TINY_BASE_REPO}")
    version = version_serving(deployment, f"hf://{TINY_BASE_REPO}", HUB_TOKEN_REF)
    server = build_version_children(REF, version, IMAGES)[0]
    init_only = {**pod_spec_of(server), "containers": []}
    pod = cluster.run_pod("version-tuned", init_only, extra_env=HUB_ENV)
    assert pod.init_logs["fetch-model"].strip().splitlines()[-1].startswith(f"{REF.name}-tuned:")
    fetched = hub_mirror.read_text(encoding="utf-8")
    requests = [line for line in fetched.splitlines() if line.startswith(("GET ", "HEAD "))]
    model_requests = [line for line in requests if TINY_BASE_REPO in line]
    assert any(line.startswith(f"GET /{TINY_BASE_REPO}/resolve/") for line in model_requests), fetched
    assert all(line.endswith(" 200") for line in model_requests), fetched  # each sent the Secret's token


ADAPTER_URI = "pvc://artifacts/support-bot/v1"
BASE_ON_ANOTHER_CLAIM = "pvc://models/tiny-base"


def publish_adapter_with_base_on_another_claim(cluster: SandboxCluster, adapter: Path, base: Path) -> None:
    """The adapter at ADAPTER_URI, its base at BASE_ON_ANOTHER_CLAIM, as its lineage manifest says."""
    published = cluster.claim("artifacts") / "support-bot" / "v1"
    shutil.copytree(adapter, published)
    shutil.copytree(base, cluster.claim("models") / "tiny-base")
    manifest_path = published / "kubetune-manifest.json"
    manifest = json.loads(manifest_path.read_text(encoding="utf-8"))
    manifest["baseModel"] = {"uri": BASE_ON_ANOTHER_CLAIM, "kind": "local"}
    manifest_path.write_text(json.dumps(manifest), encoding="utf-8")


def test_a_lora_adapter_whose_base_is_on_another_claim_is_built_and_served(
    cluster: SandboxCluster, hub_adapter: Path, tiny_model: Path
) -> None:
    """A FineTuneJob's unmerged adapter on one claim, its base (the job's spec.baseModel.uri) on another:
    the operator mounts both claims in the init container, which builds the Bento; the server answers."""
    publish_adapter_with_base_on_another_claim(cluster, hub_adapter, tiny_model)
    pod, pod_spec, port = start_version(cluster, ADAPTER_URI, base_model_uri=BASE_ON_ANOTHER_CLAIM)
    assert pod.init_logs["fetch-model"].strip().splitlines()[-1].startswith(f"{REF.name}-tuned:")
    assert_serves(pod, pod_spec, port)


def test_an_adapter_whose_base_the_operator_does_not_know_fails_the_build_naming_the_claim(
    cluster: SandboxCluster, hub_adapter: Path, tiny_model: Path
) -> None:
    """A ``uri`` version: the planner cannot read the adapter, so a base on another claim is not
    mounted, and the build says which claim is missing instead of a bare 'not a directory'."""
    publish_adapter_with_base_on_another_claim(cluster, hub_adapter, tiny_model)
    with pytest.raises(PodFailed) as failure:
        start_version(cluster, ADAPTER_URI)
    message = str(failure.value)
    assert "init container fetch-model exited" in message
    assert BASE_ON_ANOTHER_CLAIM in message and "PersistentVolumeClaim models" in message


def test_a_model_on_a_claim_is_served_and_the_gateway_pod_routes_to_it(
    tmp_path: Path, tiny_model: Path
) -> None:
    """The version's pod builds its Bento from the claim and serves it; the gateway pod, from its
    rendered command and ConfigMap volume, answers its probes and sends requests to the version's
    Service."""
    model_uri = "pvc://models/tiny-base"
    service_host = f"{version_child_name(REF.name, 'tuned')}.{NAMESPACE}.svc"
    cluster = SandboxCluster(tmp_path / "cluster", service_hosts=[service_host])
    try:
        shutil.copytree(tiny_model, cluster.claim("models") / "tiny-base")
        version_pod, version_spec, version_port = start_version(cluster, model_uri)
        assert version_pod.init_logs["fetch-model"].strip().splitlines()[-1].startswith(f"{REF.name}-tuned:")
        assert_serves(version_pod, version_spec, version_port)

        deployment = model_deployment(model_uri)
        config = gateway_config(
            deployment, {"tuned": version_url(REF, "tuned")}, {"tuned": 100}, {"tuned": True}
        )
        assert config is not None
        children = build_gateway_children(REF, config, IMAGES)
        config_map = next(child for child in children if child["kind"] == "ConfigMap")
        gateway = next(child for child in children if child["kind"] == "Deployment")
        cluster.apply(config_map)
        gateway_spec = pod_spec_of(gateway)
        gateway_pod = cluster.run_pod("gateway", gateway_spec)
        port = cluster.port_forward(GATEWAY_PORT)
        probes = dict(iter_probe_paths(serving_container(gateway_spec)))
        assert set(probes) == {"livenessProbe", "readinessProbe"}
        wait_until_answers(f"http://127.0.0.1:{port}{probes['readinessProbe']}", gateway_pod, 120)
        for kind, path in probes.items():
            assert httpx.get(f"http://127.0.0.1:{port}{path}", timeout=10).status_code == 200, kind

        answer = httpx.post(
            f"http://127.0.0.1:{port}/v1/completions",
            json={"model": REF.name, "prompt": "ticket about billing", "max_tokens": 3},
            timeout=120,
        )
        gateway_log = gateway_pod.container("gateway").output()[-4000:]
        assert answer.status_code == 200, f"{answer.text}\n{gateway_log}"
        assert answer.headers["x-kubetune-version"] == "tuned"
        assert answer.json()["usage"]["completion_tokens"] >= 1
    finally:
        cluster.close()
