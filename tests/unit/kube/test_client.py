"""Kopf and kubetune's client log in from one kubeconfig (kubetune.kube.client)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import kopf
import pytest
import yaml

from kubetune.kube.client import cluster_config, connection_info, uses_credential_plugin


def kubeconfig(path: Path, user: dict[str, Any], cluster: dict[str, Any] | None = None) -> Path:
    path.write_text(
        yaml.safe_dump(
            {
                "apiVersion": "v1",
                "kind": "Config",
                "clusters": [
                    {"name": "c", "cluster": {"server": "https://k8s.example:6443", **(cluster or {})}}
                ],
                "users": [{"name": "u", "user": user}],
                "contexts": [
                    {"name": "ctx", "context": {"cluster": "c", "user": "u", "namespace": "team-a"}}
                ],
                "current-context": "ctx",
            }
        )
    )
    return path


def test_kopf_gets_the_server_token_ca_and_namespace_of_the_current_context(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    (tmp_path / "ca.crt").write_text("-----BEGIN CERTIFICATE-----\n")
    path = kubeconfig(tmp_path / "config", {"token": "s3cret"}, {"certificate-authority": "ca.crt"})
    monkeypatch.setenv("KUBECONFIG", str(path))
    info = connection_info(cluster_config())
    assert (info.server, info.token, info.default_namespace) == (
        "https://k8s.example:6443",
        "s3cret",
        "team-a",
    )
    assert Path(str(info.ca_path)) == tmp_path / "ca.crt"  # relative to the kubeconfig, as kubectl reads it
    assert not info.insecure and info.certificate_path is None


def test_a_token_file_is_read_and_client_certificates_are_passed_on(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    (tmp_path / "token").write_text("from-a-file\n")
    path = kubeconfig(
        tmp_path / "config", {"tokenFile": str(tmp_path / "token")}, {"insecure-skip-tls-verify": True}
    )
    monkeypatch.setenv("KUBECONFIG", str(path))
    info = connection_info(cluster_config())
    assert (info.token, info.insecure) == ("from-a-file", True)

    certificate = {"client-certificate-data": "Q0VSVA==", "client-key-data": "S0VZ"}
    monkeypatch.setenv("KUBECONFIG", str(kubeconfig(tmp_path / "config", certificate)))
    info = connection_info(cluster_config())
    assert (info.certificate_data, info.private_key_data, info.token) == ("Q0VSVA==", "S0VZ", None)


def test_credential_plugins_are_told_apart_from_static_credentials(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    plugin = {"exec": {"apiVersion": "client.authentication.k8s.io/v1", "command": "aws"}}
    monkeypatch.setenv("KUBECONFIG", str(kubeconfig(tmp_path / "config", plugin)))
    config = cluster_config()
    assert uses_credential_plugin(config)
    with pytest.raises(kopf.LoginError, match="gets its credentials from a plugin"):
        connection_info(config)


def test_no_credentials_at_all_is_a_login_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("KUBECONFIG", str(tmp_path / "absent"))
    with pytest.raises(kopf.LoginError, match="no Kubernetes credentials"):
        cluster_config()
