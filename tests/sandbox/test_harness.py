"""The sandbox itself: it enforces what a kubelet enforces, or the pod tests would prove nothing."""

from __future__ import annotations

import base64
from typing import Any

import pytest

from sandbox.harness import REPO, PodFailed, SandboxCluster, image_for

RUNTIME_IMAGE = "ghcr.io/kubetune/runtime:0.1.0"


def pod(
    script: str, mounts: list[dict[str, Any]], volumes: list[dict[str, Any]], **extra: Any
) -> dict[str, Any]:
    container = {
        "name": "main",
        "image": RUNTIME_IMAGE,
        "command": ["sh", "-c", script],
        "volumeMounts": mounts,
    }
    return {"containers": [{**container, **extra}], "volumes": volumes}


def test_only_declared_mounts_are_writable_and_read_only_ones_are_not(cluster: SandboxCluster) -> None:
    cluster.claim("store")
    spec = pod(
        "touch /var/tmp/scratch/ok /mnt/pvc/store/ok && "
        "! touch /etc/x 2>/dev/null && ! touch /tmp/x 2>/dev/null && ! touch /mnt/pvc/ro/x 2>/dev/null && "
        "! touch /var/lib/x 2>/dev/null && echo enforced",
        [
            {"name": "scratch", "mountPath": "/var/tmp/scratch"},
            {"name": "store", "mountPath": "/mnt/pvc/store"},
            {"name": "ro", "mountPath": "/mnt/pvc/ro", "readOnly": True},
            {"name": "cache", "mountPath": "/var/lib/cache"},
        ],
        [
            {"name": "scratch", "emptyDir": {}},
            {"name": "store", "persistentVolumeClaim": {"claimName": "store"}},
            {"name": "ro", "persistentVolumeClaim": {"claimName": "store"}},
            {"name": "cache", "emptyDir": {}},
        ],
    )
    assert "enforced" in cluster.run_to_completion("writes", spec, timeout_s=60)
    assert (cluster.claim("store") / "ok").is_file()


def test_the_user_is_the_security_context_s_else_the_image_s(cluster: SandboxCluster) -> None:
    as_pod_user = {**pod("id -u", [], []), "securityContext": {"runAsUser": 1000, "runAsNonRoot": True}}
    assert cluster.run_to_completion("pod-user", as_pod_user, timeout_s=60).strip() == "1000"
    assert cluster.run_to_completion("image-user", pod("id -u", [], []), timeout_s=60).strip() == str(
        image_for(RUNTIME_IMAGE).user
    )


def test_secrets_and_config_maps_reach_env_and_volumes_read_only(cluster: SandboxCluster) -> None:
    cluster.apply(
        {"kind": "Secret", "metadata": {"name": "hub"}, "data": {"token": base64.b64encode(b"t0k").decode()}}
    )
    cluster.apply({"kind": "ConfigMap", "metadata": {"name": "gw"}, "data": {"gateway.json": "{}"}})
    spec = pod(
        'echo "$HF_TOKEN $(cat /etc/kubetune/gateway.json) $(ls -A /etc/kubetune/access | wc -l)" && '
        "! touch /etc/kubetune/x 2>/dev/null && echo ro",
        [
            {"name": "config", "mountPath": "/etc/kubetune", "readOnly": False},
            {"name": "access", "mountPath": "/etc/kubetune/access"},
        ],
        [
            {
                "name": "config",
                "configMap": {"name": "gw", "items": [{"key": "gateway.json", "path": "gateway.json"}]},
            },
            # optional and absent: an empty directory, inside the other volume's mount
            {"name": "access", "secret": {"secretName": "absent", "optional": True}},
        ],
        env=[{"name": "HF_TOKEN", "valueFrom": {"secretKeyRef": {"name": "hub", "key": "token"}}}],
    )
    assert cluster.run_to_completion("objects", spec, timeout_s=60).split() == ["t0k", "{}", "0", "ro"]


def test_the_image_is_stood_in_by_its_dockerfile_env_and_this_python() -> None:
    runtime = image_for(RUNTIME_IMAGE)
    assert runtime.env["HF_HOME"] == "/tmp/huggingface"
    assert runtime.env["PATH"].split(":")[0].endswith("/bin") and "/opt/venv" not in runtime.env["PATH"]
    assert runtime.user == 65532
    assert (REPO / "manifests" / "images" / "runtime.Dockerfile").is_file()


def test_a_failing_init_container_stops_the_pod_with_its_log(cluster: SandboxCluster) -> None:
    spec = {
        "initContainers": [
            {"name": "first", "image": RUNTIME_IMAGE, "command": ["sh", "-c", "echo nope; exit 3"]}
        ],
        "containers": [{"name": "never", "image": RUNTIME_IMAGE, "command": ["true"]}],
    }
    with pytest.raises(PodFailed, match=r"init container first exited 3:\nnope"):
        cluster.run_pod("failing", spec)
