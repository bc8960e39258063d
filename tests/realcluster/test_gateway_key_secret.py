"""API keys on a real API server: ``kubetune keys ... --cluster`` writes the key hashes into the
deployment's gateway Secret, and two gateway processes, each watching that Secret as the gateway's own
ServiceAccount (bound only to the Role ``kubetune keys`` creates), honour a new key and a revocation
within seconds, without a restart. The gateway config is the one the operator renders (its
ConfigMap), with the mounted copy of the Secret absent, as in a pod started before the first key:
the keys and the signing key of response ids come from the watch alone.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import ExitStack
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml

from gateway_processes import serve_chat_completions, start_gateway
from kubetune.kube.children import (
    GATEWAY_CONFIG_KEY,
    ChildImages,
    build_gateway_children,
    gateway_access_secret_name,
    gateway_service_account_name,
)
from kubetune.plan.versions import DeploymentRef
from realcluster.cluster_objects import modeldeployment
from realcluster.control_plane import ControlPlane

pytestmark = pytest.mark.realcluster

DEPLOYMENT = "bot"
SECONDS_TO_APPLY = 5.0  # "within seconds": what a created or revoked key may take on every replica


@pytest.fixture(scope="module")
def model_server() -> Iterator[str]:
    with serve_chat_completions() as url:
        yield url


def keys_command(namespace: str, *args: str) -> list[str]:
    """``kubetune keys ARGS[0] mdep/bot ARGS[1:] -n NAMESPACE --cluster``."""
    command, *rest = args
    where = ["-n", namespace, "--cluster"]
    return [sys.executable, "-m", "kubetune", "keys", command, f"mdep/{DEPLOYMENT}", *rest, *where]


def admin_env(control_plane: ControlPlane) -> dict[str, str]:
    return {**os.environ, "KUBECONFIG": str(control_plane.kubeconfig)}


def keys_cli(control_plane: ControlPlane, namespace: str, *args: str) -> subprocess.CompletedProcess[str]:
    """``kubetune keys ...`` (:func:`keys_command`) as the cluster's admin."""
    return subprocess.run(
        keys_command(namespace, *args),
        env=admin_env(control_plane),
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


def apply_deployment(control_plane: ControlPlane, namespace: str) -> None:
    """ModelDeployment bot in ``namespace`` (server-side apply, as the cluster's admin)."""
    control_plane.kubectl(
        "apply",
        "--server-side",
        "-n",
        namespace,
        "-f",
        "-",
        stdin=yaml.safe_dump(modeldeployment(DEPLOYMENT)),
    )


def rendered_gateway_config(namespace: str, uid: str, model_url: str, tmp_path: Path) -> dict[str, Any]:
    """The gateway.json the operator renders for mdep/bot, its version at ``model_url``; the Secret's
    mounted copy (keysFile, signingKeyFile) points at files that do not exist."""
    ref = DeploymentRef(name=DEPLOYMENT, namespace=namespace, uid=uid)
    config = {
        "deployment": DEPLOYMENT,
        "namespace": namespace,
        "versions": [{"name": "tuned", "url": model_url, "weight": 100}],
        "access": {"audit": {"stdout": False}},
    }
    children = build_gateway_children(ref, config, ChildImages())
    config_map = next(child for child in children if child["kind"] == "ConfigMap")
    rendered: dict[str, Any] = json.loads(config_map["data"][GATEWAY_CONFIG_KEY])
    assert rendered["access"]["auth"] == "required"
    assert rendered["access"]["keysSecret"] == gateway_access_secret_name(DEPLOYMENT)
    rendered["access"]["keysFile"] = str(tmp_path / "not-mounted" / "keys.json")
    rendered["access"]["signingKeyFile"] = str(tmp_path / "not-mounted" / "signing.key")
    return rendered


def start_gateways(
    stack: ExitStack, config: dict[str, Any], kubeconfig: Path, tmp_path: Path, count: int = 2
) -> list[str]:
    config_path = tmp_path / "gateway.json"
    config_path.write_text(json.dumps(config))
    env = {**os.environ, "KUBECONFIG": str(kubeconfig)}
    return [
        start_gateway(stack, config_path, tmp_path / f"gateway-{index}.log", env=env, healthy_within_s=90)
        for index in range(count)
    ]


def status_of(url: str, token: str) -> int:
    body = {"model": DEPLOYMENT, "messages": [{"role": "user", "content": "hello"}]}
    headers = {"Authorization": f"Bearer {token}"}
    return httpx.post(f"{url}/v1/chat/completions", json=body, headers=headers, timeout=30).status_code


def answers(url: str, token: str, status: int) -> Callable[[], bool]:
    return lambda: status_of(url, token) == status


def seconds_until(condition: Callable[[], bool], timeout_s: float = 60.0) -> float:
    """How long until ``condition()`` holds (polled); fails after ``timeout_s``."""
    started = time.monotonic()
    while not condition():
        assert time.monotonic() - started < timeout_s, "the condition never held"
        time.sleep(0.05)
    return time.monotonic() - started


def test_keys_created_and_revoked_with_the_cli_apply_on_both_gateways_within_seconds(
    control_plane: ControlPlane, kubetune_crds: list[str], namespace: str, model_server: str, tmp_path: Path
) -> None:
    apply_deployment(control_plane, namespace)
    uid = control_plane.kubectl(
        "get", "modeldeployment", DEPLOYMENT, "-n", namespace, "-o", "jsonpath={.metadata.uid}"
    ).stdout
    # the gateway's identity, as the operator renders it (a ServiceAccount with no rights of its own)
    gateway_kubeconfig = control_plane.service_account_kubeconfig(
        namespace, gateway_service_account_name(DEPLOYMENT)
    )

    first = keys_cli(
        control_plane, namespace, "create", "--tenant", "team-a", "--scopes", "inference,feedback"
    )
    assert first.returncode == 0, first.stderr
    first_token = first.stdout.strip()
    assert first_token.startswith("kt-") and "warning" not in first.stderr

    secret_name = gateway_access_secret_name(DEPLOYMENT)
    secret = json.loads(
        control_plane.kubectl("get", "secret", secret_name, "-n", namespace, "-o", "json").stdout
    )
    assert sorted(secret["data"]) == ["keys.json", "signing.key"]
    assert first_token.split("_", 1)[1] not in json.dumps(secret)  # hashes only
    assert secret["metadata"]["ownerReferences"][0]["uid"] == uid  # goes with the ModelDeployment

    # the gateway's ServiceAccount may read that Secret and nothing else
    def can(*args: str) -> str:
        result = control_plane.kubectl(
            "auth", "can-i", *args, "-n", namespace, kubeconfig=gateway_kubeconfig, check=False
        )
        return str(result.stdout).strip()

    assert can("watch", f"secrets/{secret_name}") == "yes"
    assert can("get", "secrets/another-secret") == "no"
    assert can("list", "secrets") == "no"
    assert can("update", f"secrets/{secret_name}") == "no"

    config = rendered_gateway_config(namespace, uid, model_server, tmp_path)
    with ExitStack() as stack:
        gateways = start_gateways(stack, config, gateway_kubeconfig, tmp_path)
        for url in gateways:
            seconds_until(answers(url, first_token, 200))
            assert status_of(url, "kt-000000000000_not-a-key") == 401

        # both sign response ids with the Secret's signing key (their mounted copy is missing), so
        # feedback on one's answer is accepted by the other
        headers = {"Authorization": f"Bearer {first_token}"}
        body = {"model": DEPLOYMENT, "messages": [{"role": "user", "content": "hello"}]}
        answer = httpx.post(f"{gateways[0]}/v1/chat/completions", json=body, headers=headers, timeout=30)
        rated = httpx.post(
            f"{gateways[1]}/v1/feedback", json={"requestId": answer.json()["id"], "score": 1}, headers=headers
        )
        assert rated.status_code == 200, rated.text

        # a key created while the gateways run works on both within seconds, without a restart
        second = keys_cli(control_plane, namespace, "create", "--tenant", "team-b", "--scopes", "inference")
        assert second.returncode == 0, second.stderr
        second_token = second.stdout.strip()
        waited = max(seconds_until(answers(url, second_token, 200)) for url in gateways)
        assert waited < SECONDS_TO_APPLY, f"a new key took {waited:.1f}s"

        listed = keys_cli(control_plane, namespace, "list", "-o", "json")
        assert listed.returncode == 0, listed.stderr
        ids = [key["id"] for key in json.loads(listed.stdout)["keys"]]
        first_id = first_token.removeprefix("kt-").split("_", 1)[0]
        assert first_id in ids and len(ids) == 2

        revoked = keys_cli(control_plane, namespace, "revoke", first_id)
        assert revoked.returncode == 0, revoked.stderr
        waited = max(seconds_until(answers(url, first_token, 401)) for url in gateways)
        assert waited < SECONDS_TO_APPLY, f"a revocation took {waited:.1f}s"
        assert all(status_of(url, second_token) == 200 for url in gateways)  # the other key still works

        # deleting the Secret leaves no valid key (authentication stays required)
        control_plane.kubectl("delete", "secret", secret_name, "-n", namespace)
        waited = max(seconds_until(answers(url, second_token, 401)) for url in gateways)
        assert waited < SECONDS_TO_APPLY, f"a deleted Secret took {waited:.1f}s"


def test_keys_cli_names_a_missing_deployment(
    control_plane: ControlPlane, kubetune_crds: list[str], namespace: str
) -> None:
    result = keys_cli(control_plane, namespace, "create", "--tenant", "team-a")
    assert result.returncode == 1
    assert f'ModelDeployment "{DEPLOYMENT}" not found in namespace {namespace}' in result.stderr
    assert control_plane.kubectl("get", "secrets", "-n", namespace, "-o", "name").stdout.strip() == ""


def test_concurrent_creates_lose_no_key(
    control_plane: ControlPlane, kubetune_crds: list[str], namespace: str
) -> None:
    apply_deployment(control_plane, namespace)
    creates = [
        subprocess.Popen(
            keys_command(namespace, "create", "--tenant", f"team-{index}"),
            env=admin_env(control_plane),
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for index in range(3)
    ]
    tokens = []
    for process in creates:
        stdout, stderr = process.communicate(timeout=120)
        assert process.returncode == 0, stderr
        tokens.append(stdout.strip())
    listed = keys_cli(control_plane, namespace, "list", "-o", "json")
    assert listed.returncode == 0, listed.stderr
    stored = {key["id"] for key in json.loads(listed.stdout)["keys"]}
    assert stored == {token.removeprefix("kt-").split("_", 1)[0] for token in tokens}
